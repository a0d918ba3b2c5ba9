"""MobileNetV2 for 32x32 inputs (models/mobilenetv2.py) and the torchvision-backed ImageNet ResNet-50 and
MobileNetV2 (models/torchvision_nets.py): sizes against independent counts, and the round trip of a trained
peer's weights into ``torchvision.models`` (same logits)."""
import pytest
import torch
import torchvision

from models import count_parameters, create_model
from models.grouped import NotGroupableError
from models.peers import Peers
from models.torchvision_nets import to_torchvision_state, torchvision_model


def repdistiller_mobilenetv2_params(width, classes, t=6):
    """RepDistiller's models/mobilenetv2.py counted layer by layer (convs without bias, BN weight + bias)."""
    settings = [(1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1), (t, 160, 3, 2),
                (t, 320, 1, 1)]
    cin = int(32 * width)
    total = 27 * cin + 2 * cin
    for e, c, n, _ in settings:
        for _ in range(n):
            cout, hidden = int(c * width), cin * e
            total += cin * hidden + 2 * hidden + 9 * hidden + 2 * hidden + hidden * cout + 2 * cout
            cin = cout
    last = int(1280 * width) if width > 1 else 1280
    return total + cin * last + 2 * last + last * classes + classes


@pytest.mark.parametrize("name,width", [("mobilenetv2_x0_5", 0.5), ("mobilenetv2", 1.0)])
def test_cifar_mobilenetv2_size_and_shapes(name, width):
    net = create_model(name, num_classes=100)
    assert count_parameters(net) == repdistiller_mobilenetv2_params(width, 100)
    if width == 0.5:
        assert count_parameters(net) == 812_836     # the 0.81M of the CIFAR-100 KD tables (mobile_half)
    out = net(torch.randn(2, 3, 32, 32), return_stages=True)
    assert [tuple(m.shape[2:]) for m in out.stages] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert [m.shape[1] for m in out.stages] == net.stage_widths and out.logits.shape == (2, 100)


@pytest.mark.parametrize("name,params", [("resnet50", 25_557_032), ("mobilenet_v2", 3_504_872)])
def test_torchvision_archs_have_torchvisions_size(name, params):
    with torch.device("meta"):
        ours, theirs = create_model(name, num_classes=1000), torchvision_model(name, 1000)
    assert count_parameters(ours) == count_parameters(theirs) == params
    assert ours.num_stages == 4


def test_trained_heterogeneous_peers_load_into_torchvision():
    """ResNet-50 + MobileNetV2 peers after a few SGD steps (weights and BN statistics moved): each peer's state,
    renamed only, loads strictly into torchvision's network and gives the same logits."""
    torch.manual_seed(0)
    peers = Peers("resnet50,mobilenet_v2", 10, 2)
    opt = torch.optim.SGD(peers.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    for _ in range(2):
        loss = sum(torch.nn.functional.cross_entropy(z, y) for z in peers(x).logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    peers.eval()
    with torch.no_grad():
        ours = peers(x).logits
        for i, name in enumerate(("resnet50", "mobilenet_v2")):
            net = getattr(torchvision.models, name)(num_classes=10)
            state = to_torchvision_state(name, peers.single_network(i).state_dict(), 10)
            net.load_state_dict(state)          # strict: every key and shape matches
            assert state.keys() == net.state_dict().keys()
            torch.testing.assert_close(net.eval()(x), ours[i], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mobilenetv2_x0_5", "resnet50"])
def test_grouping_is_refused(arch):
    peers = Peers(arch, 10, 2)
    with pytest.raises(NotGroupableError, match="grouped"):
        peers.group_branches()
