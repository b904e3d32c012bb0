"""Small helpers the fixture scripts share for the ONNX files they write."""
from __future__ import annotations

from pathlib import Path

import onnx


def iter_nodes(graph):
    """Every node of ``graph`` and of the subgraphs in its attributes (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            for g in attr.graphs:
                yield from iter_nodes(g)


def strip_stack_traces(path: Path) -> None:
    """Drop the dynamo exporter's per-node ``pkg.torch.onnx.stack_trace`` metadata: it embeds absolute
    source paths and line numbers of this machine, which would make the committed files
    non-reproducible (the rest of the metadata is kept). External data is left as the exporter wrote it:
    the model is read without it and saved back with the same (relative) locations."""
    model = onnx.load(str(path), load_external_data=False)
    for node in iter_nodes(model.graph):
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(model, str(path))
