#!/usr/bin/env python
"""Small models: the committed 32x32 fixtures' relevance graph against their plain forward pass, in one
process, and the floor that onnxruntime's per-node cost sets for graphs this small.

For each fixture (models_fixtures/{resnet,vgg,mobilenet,mlp}.onnx) and batch size it prints the median of
``--repeats`` calls of: the plain onnxruntime forward of the file; ``onnxlrp.LRP(...).analyze(x)`` (the
whole call: input checks, binding, the run, the finiteness and explosion checks); the relevance graph's
``session.run`` alone; and a chain of as many Add nodes as the relevance graph has nodes, on tensors of
the fixture's input size: what onnxruntime's per-node dispatch costs before any arithmetic.

    python benchmarks/bench_small.py [--repeats 200] [--batches 2,16] [--composite EpsilonGammaBox]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import onnxlrp

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models_fixtures")
FIXTURES = ("resnet", "vgg", "mobilenet", "mlp")


def median_ms(fn, repeats, warmup=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def chain_session(n_nodes, shape):
    """n_nodes Adds in a row on a tensor of ``shape``: per-node dispatch with almost no arithmetic."""
    nodes, last = [], "x"
    for i in range(n_nodes):
        nodes.append(helper.make_node("Add", [last, "one"], [f"t{i}"]))
        last = f"t{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batches", default="2,16")
    parser.add_argument("--composite", default="EpsilonGammaBox")
    args = parser.parse_args()
    composite = (onnxlrp.EpsilonGammaBox(-3.0, 3.0) if args.composite == "EpsilonGammaBox"
                 else getattr(onnxlrp, args.composite)())
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} logical cores, composite {args.composite}, "
          f"median of {args.repeats} calls")
    header = ("model", "batch", "nodes fwd/lrp", "forward ms", "analyze ms", "run ms", "node floor ms",
              "analyze/fwd", "run/fwd", "floor/fwd")
    print(" | ".join(header))
    for name in FIXTURES:
        path = os.path.join(ROOT, name + ".onnx")
        forward = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        x_info = forward.get_inputs()[0]
        fwd_nodes = len(onnx.load(path).graph.node)
        analyzer = onnxlrp.LRP(path, composite, verbose=False, device="cpu", cache=False)
        feature_shape = tuple(analyzer.input_shape[1:])
        lrp_nodes = len(analyzer.relevance_model.graph.node)
        session = analyzer._built[feature_shape][1]
        for batch in (int(b) for b in args.batches.split(",")):
            x = np.random.default_rng(0).standard_normal((batch, *feature_shape)).astype(np.float32)
            feeds = analyzer._feeds(x, None, None, analyzer._out_shapes[feature_shape])
            chain = chain_session(lrp_nodes, list(x.shape))
            f = median_ms(lambda: forward.run(None, {x_info.name: x}), args.repeats)
            a = median_ms(lambda: analyzer.analyze(x), args.repeats)
            r = median_ms(lambda: session.run(None, feeds), args.repeats)
            c = median_ms(lambda: chain.run(None, {"x": x}), args.repeats)
            print(f"{name} | {batch} | {fwd_nodes}/{lrp_nodes} | {f:.3f} | {a:.3f} | {r:.3f} | {c:.3f} | "
                  f"{a / f:.1f}x | {r / f:.1f}x | {c / f:.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
