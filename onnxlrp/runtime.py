"""onnxruntime sessions: the CUDA provider where it is present and actually loads, else the CPU."""
from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort

from .errors import DeviceError

_notified = set()
_cuda_works = None


def cuda_available() -> bool:
    """Whether onnxruntime's CUDA provider actually loads here (listed is not enough: onnxruntime-gpu
    lists it on every machine and silently falls back to the CPU when CUDA or cuDNN is missing)."""
    global _cuda_works
    if _cuda_works is None:
        _cuda_works = False
        if "CUDAExecutionProvider" in ort.get_available_providers():
            from onnx import TensorProto, helper
            graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
            ort.set_default_logger_severity(4)  # the failed load logs errors we report ourselves
            try:
                probe = ort.InferenceSession(model.SerializeToString(),
                                             providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
                _cuda_works = "CUDAExecutionProvider" in probe.get_providers()
            except Exception:
                _cuda_works = False
            finally:
                ort.set_default_logger_severity(2)
    return _cuda_works


def _notice(msg):
    if msg not in _notified:
        _notified.add(msg)
        print(f"onnxlrp: {msg}", file=sys.stderr)


def cuda_provider_options(allow_tf32=False, cudnn_conv_algo_search="EXHAUSTIVE"):
    """CUDA provider options. TF32 is off by default: relevance needs float32-exact convolutions
    (TF32 keeps 10 mantissa bits); turn it on for speed when 1e-3 relative error is acceptable."""
    if cudnn_conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        raise ValueError("cudnn_conv_algo_search must be EXHAUSTIVE, HEURISTIC or DEFAULT")
    return {"use_tf32": int(bool(allow_tf32)), "cudnn_conv_algo_search": cudnn_conv_algo_search}


#: Constants from this size on go to the session as OrtValues instead of through the serialized graph.
DETACH_MIN_BYTES = 1 << 12
#: The external-data location of a detached weight's placeholder: it names no file, the session gets the data.
IN_MEMORY = "onnxlrp-in-memory"
_DETACHABLE = (np.float16, np.float32, np.float64, np.int32, np.int64)


def detach_weights(graph) -> dict:
    """Replace every large constant of the gs ``graph`` (the relevance graph's weights and modified weights)
    by an external-data placeholder, and return {name: array} to give to make_session(weights=...).

    Serializing a VGG16 relevance graph (three copies of 550 MB of weights: W, the Gamma rule's W + gamma W+
    and its flipped transpose) copied every array into a protobuf, then into bytes, then onnxruntime parsed
    them again: 8 s and 1.6 GB of transient memory before the session existed. onnxruntime's
    ``add_external_initializers`` takes the numpy arrays as they are instead."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues
    weights = {}
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or tensor.name in weights:
            continue
        values = np.asarray(tensor.values)
        if values.nbytes < DETACH_MIN_BYTES or values.dtype.type not in _DETACHABLE or \
                tensor.export_dtype != tensor.dtype:
            continue
        proto = onnx.TensorProto(name=tensor.name, data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype),
                                 dims=values.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", IN_MEMORY), ("offset", "0"), ("length", str(values.nbytes))):
            proto.external_data.add(key=key, value=value)
        weights[tensor.name] = np.ascontiguousarray(values)
        tensor._values = LazyValues(proto)  # the exporter writes this proto as it is
    return weights


#: a weight lift_dense_weights moves out of the graph is at least this large
LIFT_MIN_BYTES = 1 << 20


def lift_dense_weights(graph, weights) -> dict:
    """Turn the large weights of the gs ``graph`` that only matrix products read as their second operand
    (a CNN's dense layers: the forward Gemm and the transposed one of the relevance pass) into graph inputs,
    and return {name: array} (taken out of ``weights``, detach_weights' arrays) for WeightFeedingSession.

    For sessions without pre-packing only (see _session_options): a product then reads its weight as it is,
    constant or input, and gives the same result bit for bit. As initializers, VGG16's 495 MB of dense
    weights cost 0.5 of the session's 1.0 s and 0.9 s more where onnxruntime saves its optimized graph
    (onnxlrp.cache), which copies and writes them; as inputs they cost neither (the cache writes them
    itself, on a thread)."""
    import onnx_graphsurgeon as gs
    lifted = {}
    tensors = graph.tensors()
    for name in list(weights):
        tensor, array = tensors.get(name), weights[name]
        if not isinstance(tensor, gs.Constant) or array.nbytes < LIFT_MIN_BYTES or array.dtype != np.float32:
            continue
        readers = [(node, [i for i, t in enumerate(node.inputs) if t is tensor]) for node in tensor.outputs]
        if not readers or any(node.op not in ("Gemm", "MatMul") or places != [1] for node, places in readers):
            continue
        del weights[name]
        tensor.to_variable(np.float32, list(array.shape))
        tensor.type = "tensor_type"  # what gs's exporter asks of a Variable that __init__ would have set
        graph.inputs.append(tensor)
        lifted[name] = array
    return lifted


class WeightFeedingSession:
    """An onnxruntime session whose graph takes some weights as inputs (lift_dense_weights): every run is
    given them, and the session looks to its callers as if they were still part of the graph."""

    def __init__(self, session, weight_inputs):
        self.session, self.weight_inputs = session, dict(weight_inputs)

    def run(self, output_names, input_feed, run_options=None):
        return self.session.run(output_names, {**input_feed, **self.weight_inputs}, run_options)

    def get_inputs(self):
        return [i for i in self.session.get_inputs() if i.name not in self.weight_inputs]

    def io_binding(self):
        binding = self.session.io_binding()
        for name, array in self.weight_inputs.items():
            binding.bind_cpu_input(name, array)
        return binding

    def __getattr__(self, name):  # get_outputs, get_providers, run_with_iobinding, end_profiling, ...
        return getattr(self.session, name)


def _session_options(optimized=False, prepack=True, threads=None, spinning=True):
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        # idle threads sleep instead of spinning: for sessions that share the cores with other work (spinning
        # threads would take those cores from it)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        # onnxruntime copies every weight of a matrix product into its packed layout when the session is
        # made. For products whose rows are the batch alone (a CNN's dense layers) that bought nothing per
        # call on VGG16 (1536 vs 1522 ms at batch 2, within 2 % at 16) and cost 2 s of its 3 s session and
        # 600-770 MiB of its peak. Transformers' products (rows: batch x tokens) keep it (see prepacking_pays).
        options.add_session_config_entry("session.disable_prepacking", "1")
    # a graph onnxruntime optimized before (the cache's) is taken as it is
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    # The relevance graph keeps most forward tensors alive until the backward pass reads them; with
    # memory patterns on, onnxruntime's arena held 1.5x more (ViT-B batch 8: 5.9 GB peak instead of
    # 4.0 GB) and the second run re-planned slowly. ResNet50 runs within 3 % either way.
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    ort.set_default_logger_severity(3)  # graph-optimizer warnings are not the user's business
    return options


def save_optimized(options, path, weights_file):
    """Let onnxruntime write the graph it optimized to ``path``, its weights to ``weights_file`` beside it
    (which it maps, not reads, when the file is loaded again: onnxlrp.cache)."""
    options.optimized_model_filepath = path
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights_file)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(DETACH_MIN_BYTES))


def optimized_session(path, device="auto", verbose=True, prepack=True, weight_inputs=None, spinning=True):
    """A CPU session on a graph onnxruntime optimized and saved before (``save_optimized``); ``weight_inputs``:
    the arrays its lifted weights take (lift_dense_weights); ``spinning`` as for make_session."""
    session = ort.InferenceSession(path, _session_options(optimized=True, prepack=prepack, spinning=spinning),
                                   providers=["CPUExecutionProvider"])
    if device == "auto" and verbose:
        _notice("running on CPU (onnxruntime's CUDA provider is not available on this machine)")
    return WeightFeedingSession(session, weight_inputs) if weight_inputs else session


def check_device(device):
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def will_use_cuda(device) -> bool:
    return device in ("auto", "cuda") and cuda_available()


def make_session(model_bytes: bytes, device: str = "auto", verbose=True, cuda_options=None, profile=False,
                 weights=None, save_to=None, threads=None, prepack=True, weight_inputs=None, spinning=None):
    """An InferenceSession on the requested device. ``device``: "auto", "cpu" or "cuda". ``weights``: the
    arrays detach_weights took out of the graph; the session keeps them (onnxruntime reads their memory).
    ``save_to``: (path, weights file name) where onnxruntime writes the graph it optimized (CPU only).
    ``threads``: onnxruntime's intra-op threads (default: one per core), for sessions that share the cores
    with other work; their idle threads then sleep instead of spinning, which would take those cores.
    ``spinning=False`` makes idle threads sleep with the default thread count (None: spinning unless
    ``threads`` is given).
    ``prepack``: onnxruntime's weight pre-packing (see _session_options). ``weight_inputs``: the arrays of the
    weights lift_dense_weights made inputs (CPU only); the session returned then feeds them itself."""
    check_device(device)
    if spinning is None:  # a session given its threads shares the cores
        spinning = threads is None
    options = _session_options(prepack=prepack, threads=threads, spinning=spinning)
    values = None
    if weights:
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()]
        options.add_external_initializers(list(weights), values)
    available = ort.get_available_providers()
    want_cuda = will_use_cuda(device)
    if weight_inputs and want_cuda:  # before the session is made, not after
        raise ValueError("weights fed as inputs would be copied to the GPU on every run")
    if save_to is not None and not want_cuda:
        save_optimized(options, *save_to)
    if profile:
        options.enable_profiling = True
    providers = ([("CUDAExecutionProvider", cuda_options or cuda_provider_options()), "CPUExecutionProvider"]
                 if want_cuda else ["CPUExecutionProvider"])
    session = ort.InferenceSession(model_bytes, options, providers=providers)
    if weights:
        session._onnxlrp_weights = (weights, values)  # alive as long as the session
    active = session.get_providers()
    # onnxruntime-gpu on a machine without CUDA silently falls back to the CPU: look, and say so.
    if device == "cuda" and "CUDAExecutionProvider" not in active:
        raise DeviceError("device='cuda' was requested but onnxruntime's CUDA provider did not load "
                           f"(available: {available}, active: {active}); is onnxruntime-gpu installed with "
                           "a working CUDA and cuDNN?")
    if device == "auto" and "CUDAExecutionProvider" not in active and verbose:
        _notice("running on CPU (onnxruntime's CUDA provider is not available on this machine)")
    return WeightFeedingSession(session, weight_inputs) if weight_inputs else session


#: dense weights (Gemm/MatMul) from which pre-packing them costs more than it brings (see prepacking_pays)
PREPACK_DENSE_LIMIT = 64 << 20


def prepacking_pays(layers) -> bool:
    """Whether onnxruntime's weight pre-packing is worth its setup time and memory for these layers.
    Transformers keep it: their products' rows are batch x tokens (a MatMul on (N, T, H)), and ViT-B and
    BERT-base ran 4-10 % slower without it. A CNN's dense layers see (N, features): VGG16's 120 M dense
    weights ran as fast unpacked and saved 2 s and 600-770 MiB. Below PREPACK_DENSE_LIMIT packing costs
    little, and keeps results independent of the thread count: unpacked, MLAS splits a small product
    (a 1024 -> 32 layer) over K when it has several threads."""
    dense = 0
    for layer in layers:
        if layer.op_type == "MatMul" and layer.inputs[0].shape is not None and len(layer.inputs[0].shape) > 2:
            return True
        weight = getattr(layer.params, "weight", None)
        if layer.op_type in ("Gemm", "MatMul") and weight is not None:
            dense += np.asarray(weight).nbytes
    return dense < PREPACK_DENSE_LIMIT


def session_device(session) -> str:
    return "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
