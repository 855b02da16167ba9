"""What ditopt turns off while dynamo captures changes nothing that reaches the graph."""

import gc
import inspect

import pytest
import torch
from torch._dynamo import symbolic_convert

import ditopt
from ditopt.capture import capture, lean_tracing, source_names_skipped
from real_models import build


def _graph_code(model, inputs, context):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with context, torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(**inputs)
    torch._dynamo.reset()
    assert len(graphs) == 1
    return graphs[0].code, [n.meta.get("nn_module_stack") for n in graphs[0].graph.nodes]


def test_lean_tracing_captures_the_same_graph_and_puts_everything_back():
    model, inputs = build("dit")
    lookup = symbolic_convert.get_funcname
    plain = _graph_code(model, inputs, torch.enable_grad())
    lean = _graph_code(model, inputs, lean_tracing())
    assert lean == plain
    assert symbolic_convert.get_funcname is lookup
    assert gc.isenabled()


def test_source_names_are_looked_up_when_dynamo_logs_them():
    lookup = symbolic_convert.get_funcname
    torch._logging.set_logs(trace_call=True)
    try:
        with source_names_skipped():
            assert symbolic_convert.get_funcname is lookup
    finally:
        torch._logging.set_logs()
    with source_names_skipped():
        assert symbolic_convert.get_funcname is not lookup
    assert symbolic_convert.get_funcname is lookup


class _HostBranch(torch.nn.Module):
    """A Python branch on a value read on the host: no single graph."""

    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x


def test_a_capture_error_names_the_line_of_the_model_where_dynamo_stopped():
    """The message ends with the innermost frame of the model's own code (not torch's)."""
    line = inspect.getsourcelines(_HostBranch.forward)[1] + 1
    where = rf"\(at test_capture\.py:{line} in forward: `return x \* 2 if x\.sum\(\)\.item\(\) > 0 else x`"
    with pytest.raises(ditopt.CaptureError, match=rf"(?s)could not capture _HostBranch as one graph: .*{where}"):
        capture(_HostBranch(), torch.randn(3))
    fast = ditopt.optimize(_HostBranch(), ditopt.presets.all_compute(steps=2), timestep_arg="x")
    with pytest.raises(ditopt.CaptureError, match=rf"could not capture _HostBranch as one graph: dynamo raised .*{where}"):
        fast(torch.randn(3))
