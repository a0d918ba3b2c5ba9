"""Speed options that must not change the numbers: the SGD implementations (--sgd-impl)."""
import pytest
import torch

import train_dml
from engine import train
from engine.optim import sgd_implementation


def sgd_reference(params, grads_per_step, lr, momentum, wd, nesterov):
    """torch.optim.SGD's documented update, restated in float64: g += wd p; b = m b + g (b = g at step 1);
    g = g + m b (Nesterov) or b; p -= lr g."""
    params = [p.clone() for p in params]
    bufs = [None] * len(params)
    for grads in grads_per_step:
        for k, (p, g) in enumerate(zip(params, grads)):
            g = g + wd * p
            bufs[k] = g.clone() if bufs[k] is None else momentum * bufs[k] + g
            step = g + momentum * bufs[k] if nesterov else bufs[k]
            params[k] = p - lr * step
    return params


@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
def test_sgd_implementations_apply_the_documented_update(impl):
    torch.manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (10, 64)]
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(4)]
    params = [p.clone().requires_grad_() for p in start]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          **sgd_implementation(impl, torch.device("cpu")))
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(params, sgd_reference(start, grads, 0.1, 0.9, 5e-4, True)):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-13)


def test_fused_falls_back_to_foreach_where_unsupported():
    # torch accepts fused=True for any device at construction and refuses at the first step: 'meta' has
    # no fused SGD kernel, so the probe must take a step to notice.
    assert sgd_implementation("fused", torch.device("meta")) == {"foreach": True}
    assert sgd_implementation("for-loop", torch.device("cpu")) == {"foreach": False}


@pytest.mark.slow
def test_engine_uses_the_chosen_sgd_and_resume_follows_the_flag(tmp_path):
    from engine.checkpoint import load_checkpoint
    fast = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "128", "--batch-size", "64",
            "--gpu", "-1", "--no-progress", "--out", str(tmp_path)]
    train(train_dml.DML, fast + ["--epochs", "1", "--sgd-impl", "for-loop"])
    group = load_checkpoint(tmp_path / "last.pt")["optimizers"]["model"]["param_groups"][0]
    assert group["foreach"] is False and not group["fused"]
    train(train_dml.DML, fast + ["--epochs", "2", "--extend-epochs", "--resume", "auto"])   # default: fused
    group = load_checkpoint(tmp_path / "last.pt")["optimizers"]["model"]["param_groups"][0]
    assert group["fused"] is True


def test_cuda_graph_flags_are_checked(tmp_path):
    from engine import UserError
    fast = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "128", "--gpu", "-1", "--no-progress",
            "--out", str(tmp_path)]
    with pytest.raises(UserError, match="--cuda-graph needs a CUDA GPU"):
        train(train_dml.DML, fast + ["--cuda-graph"])


def test_graph_inputs_are_compared_and_copied_by_tree():
    from data.loaders import Batch
    from torch.utils._pytree import tree_leaves as tree_tensors, tree_map

    from engine.cuda_graph import shapes
    batch = Batch([torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)], torch.arange(2), torch.arange(2))
    copy = tree_map(lambda t: t.clone(), batch)
    assert isinstance(copy, Batch) and isinstance(copy.images, list) and len(tree_tensors(copy)) == 4
    assert shapes(copy) == shapes(batch)
    assert shapes(batch._replace(labels=torch.arange(3))) != shapes(batch)
    cl = batch._replace(images=[t.contiguous(memory_format=torch.channels_last) for t in batch.images])
    assert shapes(cl) != shapes(batch)      # a layout change is a new capture too


def test_a_step_that_cannot_be_captured_stops_with_a_clear_error(tmp_path):
    """--cuda-graph on the CPU, driven by a graph that fails to capture: a one-line error naming the fix."""
    from engine import Trainer, UserError, parse_args
    from engine.cuda_graph import CaptureError

    class FailingGraph:
        def __call__(self, batch, epoch):
            raise CaptureError("operation not permitted when stream is capturing")

    args = parse_args(train_dml.DML, ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "128",
                                      "--batch-size", "64", "--gpu", "-1", "--no-progress", "--out", str(tmp_path)])
    trainer = Trainer(train_dml.DML, args)
    trainer.graphed = FailingGraph()
    with pytest.raises(UserError, match=r"could not be captured .*operation not permitted.*start a new run without it"):
        trainer.train_epoch(0)


@pytest.mark.slow
def test_graphed_step_bookkeeping_on_the_cpu(tmp_path, monkeypatch):
    """GraphedStep's logic (warm-up, one capture per epoch, inputs copied into the static tensors, outputs
    overwritten in place by every replay, the engine's sums) against eager training, on the CPU.

    A fake CUDA graph stands in: capturing runs the step once (as capture + first replay would), and each
    later replay re-runs it on the static inputs and writes the results into the captured output tensors,
    the memory a real replay overwrites."""
    from contextlib import contextmanager, nullcontext

    from engine import Trainer, parse_args
    from engine import cuda_graph
    from torch.utils._pytree import tree_leaves as tree_tensors

    from engine.cuda_graph import GraphedStep

    class FakeGraph:
        def __init__(self):
            self.pending, self.rerun = True, None

        def replay(self):
            if self.pending:       # the capture has just computed this batch
                self.pending = False
            else:
                self.rerun()

    @contextmanager
    def fake_capture(graph, pool=None, stream=None):
        yield

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    for name, value in [("CUDAGraph", FakeGraph), ("graph", fake_capture), ("Stream", Stream),
                        ("stream", lambda s: nullcontext()), ("current_stream", lambda device=None: Stream()),
                        ("synchronize", lambda device=None: None)]:
        monkeypatch.setattr(cuda_graph.torch.cuda, name, value)

    class CPUGraphedStep(GraphedStep):
        def _capture(self, batch, epoch):
            super()._capture(batch, epoch)

            def rerun():
                out = self.step(self.static_in, self.epoch)
                with torch.no_grad():
                    for static, new in zip(tree_tensors(self.static_out), tree_tensors(out)):
                        static.copy_(new)
            self.graph.rerun = rerun

    argv = ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "384", "--batch-size", "64", "--gpu", "-1",
            "--no-progress", "--out", str(tmp_path), "--epochs", "3"]
    eager = Trainer(train_dml.DML, parse_args(train_dml.DML, argv))
    graphed = Trainer(train_dml.DML, parse_args(train_dml.DML, argv))
    graphed.graphed = CPUGraphedStep(graphed._captured_step, list(graphed.optimizers.values()), graphed.device)
    for epoch in range(3):
        (a, _), (b, _) = eager.train_epoch(epoch), graphed.train_epoch(epoch)
        for key in ("ce", "kd", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (epoch, key)
    steps = len(graphed.loaders.train)
    assert graphed.graphed.captures == 3 and graphed.graphed.replays == 3 * steps - 3
    for p, q in zip(eager.method.model.parameters(), graphed.method.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_an_optimizer_of_a_methods_own_is_capturable_under_cuda_graph(cuda_graph):
    """--cuda-graph builds every group's own optimizer that takes ``capturable`` with it (Adam's step count then
    stays on the device, inside the captured step), whatever the method asked; the run's SGD has no such flag."""
    from types import SimpleNamespace

    from engine import OptimGroup
    from engine.optim import Optimization
    args = SimpleNamespace(lr_scale="none", sgd_impl="foreach", cuda_graph=cuda_graph, weight_decay=0.0, lr=0.1,
                           momentum=0.9, nesterov=False, lr_schedule="cosine", epochs=10)
    w = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    opts = Optimization([OptimGroup("sgd", [w[0]]), OptimGroup("adam", [w[1]], optimizer=torch.optim.Adam),
                         OptimGroup("rmsprop", [w[2]], optimizer=torch.optim.RMSprop,
                                    extra={"alpha": 0.9, "capturable": False})],
                        args, 1, torch.device("cpu")).optimizers
    assert "capturable" not in opts["sgd"].defaults
    assert opts["adam"].defaults["capturable"] is opts["rmsprop"].defaults["capturable"] is cuda_graph
    assert opts["rmsprop"].defaults["alpha"] == 0.9
