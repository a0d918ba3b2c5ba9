"""Small methods that exercise the engine's hooks (train_step, after_step, on_epoch_end, TemporalMean), and
:func:`interrupted`, a method stopped by Ctrl-C at the start of an epoch.
Used by tests/test_method_hooks.py, in process and under torchrun through tests/ddp_worker.py. Also
:func:`build_method`, which the method tests use to build a real method without a Trainer."""
import torch
import torch.nn.functional as F
from torch import nn

from engine import Method, OptimGroup, parse_args
from models.temporal_mean import TemporalMean


def interrupted(cls, at_epoch: int):
    """``cls`` stopped by Ctrl-C at the first step of 0-based epoch ``at_epoch`` (after the previous epoch
    was saved): the method keeps its name, so the run resumes with ``cls``."""
    class Interrupted(cls):
        def train_step(self, model, batch, epoch, step):
            if epoch == at_epoch:
                raise KeyboardInterrupt
            return super().train_step(model, batch, epoch, step)
    return Interrupted


def build_method(cls, argv, num_classes: int = 10, n_train: int = 100, image_size: int = 32, **kwargs):
    """``cls`` built outside the Trainer from command-line ``argv``: parsed, checked by its ``check_args``,
    then constructed (``kwargs``: e.g. ``train_labels``)."""
    args = parse_args(cls, argv)
    cls.check_args(args)
    return cls(args, num_classes, n_train, image_size, **kwargs)


class TinyNet(nn.Module):
    """conv 3x3 -> BN -> ReLU -> global average pool -> linear: a classifier with BN statistics."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class StepCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


class NetAndCritic(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.net = TinyNet(num_classes)
        self.critic = nn.Linear(num_classes, num_classes)

    def forward(self, x):
        return self.net(x)


class AlternatingToy(Method):
    """Two optimizers stepped one after the other in every step, GAN-style: the critic on the network's
    detached logits, then the network against the (not stepped) critic; an after_step counter."""

    num_peers = None
    best_metric = "net"
    state_keys = ("counter",)

    def build(self):
        self.counter = StepCounter()
        return NetAndCritic(self.num_classes)

    def optim_groups(self):
        return [OptimGroup("net", list(self.model.net.parameters())),
                OptimGroup("critic", list(self.model.critic.parameters()), lr=0.05, scheduled=False)]

    def train_step(self, model, batch, epoch, step):
        net = getattr(model, "module", model)
        with step.autocast():
            logits = net.net(batch.images)
            critic = F.cross_entropy(net.critic(logits.detach()), batch.labels)
        step.zero_grad("critic")
        step.backward(critic)
        step.step("critic")
        with step.autocast():
            ce = F.cross_entropy(logits, batch.labels)
            fool = -0.1 * F.cross_entropy(net.critic(logits), batch.labels)
        step.zero_grad("net")
        step.backward(ce + fool)
        step.step("net")
        return {"critic": critic.detach(), "ce": ce.detach(), "fool": fool.detach()}

    def after_step(self, model, batch, epoch):
        self.counter.steps += 1


def mean_teacher_decay(n: int) -> float:
    """The mean-teacher ramp of PCL's re-implementation: min(1 - 1/(n + 1), 0.99) (0.999 there)."""
    return min(1 - 1 / (n + 1), 0.99)


class MeanTeacherToy(Method):
    """A network, a temporal mean of it (own BN statistics: run in train mode on every batch) evaluated
    as the head "mean", and with --val-split the val logits of on_epoch_end's evaluator kept in a buffer."""

    num_peers = None
    best_metric = "net"
    state_keys = ("mean", "probe")

    def build(self):
        net = TinyNet(self.num_classes)
        self.mean = TemporalMean(net, mean_teacher_decay, buffers="own")
        self.probe = nn.Module()
        self.probe.register_buffer("val_logits", torch.zeros(self.args.val_split, self.num_classes))
        self.probe.register_buffer("val_labels", torch.zeros(self.args.val_split, dtype=torch.int64))
        return net

    def loss(self, model, batch, epoch):
        with torch.no_grad():
            self.mean(batch.images)              # train mode: the mean's own BN statistics
        return {"ce": F.cross_entropy(model(batch.images), batch.labels)}

    def eval_logits(self, model, images):
        return {"net": model(images), "mean": self.mean(images)}

    def on_epoch_end(self, epoch, evaluator):
        if self.args.val_split:
            logits, labels = evaluator.predict("val")
            self.probe.val_logits.copy_(logits["net"])
            self.probe.val_labels.copy_(labels)


class NaNStateOnOneRank(Method):
    """A network whose extra module (a buffer outside the model, like a memory bank) turns NaN at the end of
    each epoch on rank 1 only, while every loss stays finite: the engine's non-finite check must stop every rank
    together (its verdict is all-reduced), not leave rank 0 waiting in the evaluation's collectives."""

    num_peers = None
    best_metric = "net"
    state_keys = ("junk",)

    def build(self):
        self.junk = nn.Module()
        self.junk.register_buffer("value", torch.zeros(3))
        return TinyNet(self.num_classes)

    def loss(self, model, batch, epoch):
        return {"ce": F.cross_entropy(model(batch.images), batch.labels)}

    def on_epoch_end(self, epoch, evaluator):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            self.junk.value.fill_(float("nan"))
