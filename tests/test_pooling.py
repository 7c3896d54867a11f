"""The separable max pool of K-FAC's no-grad forwards (runtime/pooling.py) against PyTorch's own kernel."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph
from kronograph.runtime.pooling import FastPooling, separable_max_pool

POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    (2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 1), (2, 1, 0, 2), (3, 3, 0, 1), (4, 2, 2, 1), (1, 1, 0, 1)])
def test_the_separable_pool_is_pytorch_s_bit_for_bit(rank, kernel, stride, padding, dilation):
    x = torch.randn(3, 4, *[9 - axis for axis in range(rank)], generator=torch.Generator().manual_seed(rank))
    x[0, 0].view(-1)[:5] = 0.0  # ties
    x[1, 1].view(-1)[3] = float("nan")
    x[2, 2] = float("-inf")  # a channel of -inf (and padding's -inf beside it)
    expected = POOLS[rank](x, kernel, stride, padding, dilation)
    got = separable_max_pool(x, (kernel,) * rank, (stride,) * rank, (padding,) * rank, (dilation,) * rank)
    assert got.shape == expected.shape
    assert torch.equal(got.isnan(), expected.isnan()) and expected.isnan().any()
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def _pooling_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                         nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 0)), nn.Flatten(), nn.LazyLinear(3))


def test_fast_pooling_substitutes_only_without_gradients_and_leaves_other_calls_alone():
    net = _pooling_net()
    x = torch.randn(5, 1, 12, 12)
    net(x)  # (the lazy layer)
    fast = FastPooling()
    with torch.no_grad():
        plain = net(x)
        with fast():
            assert torch.equal(net(x), plain)
    assert fast.pools is True
    calls = []

    def spy(x, *geometry):
        calls.append(geometry[0])  # the kernel
        return original(x, *geometry)

    original = separable_max_pool
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("kronograph.runtime.pooling.separable_max_pool", spy)
        with fast():
            net(x).sum().backward()  # gradients: PyTorch's kernel (a tie's gradient goes to its first element)
            with torch.no_grad():
                F.max_pool2d(x, 2, ceil_mode=True)
                F.max_pool2d(x, 2, return_indices=True)
                F.max_pool2d(x.contiguous(memory_format=torch.channels_last).expand(5, 1, 12, 12)[:, :, ::2], 2)
        assert calls == []
        with fast(), torch.no_grad():
            net(x)
        assert calls == [(2, 2), (2, 3)]
    with fast(), torch.no_grad(), pytest.raises(RuntimeError, match="pad should be"):
        F.max_pool2d(x, 2, padding=3)  # PyTorch's own error for what it refuses


def test_a_model_without_max_pools_is_not_run_under_the_mode_again():
    fast = FastPooling()
    with fast(), torch.no_grad():
        nn.Linear(3, 2)(torch.randn(4, 3))
    assert fast.pools is False
    with fast():
        assert not torch.overrides._is_torch_function_mode_enabled()


def test_kfac_steps_on_a_pooling_net_equal_those_with_pytorch_s_pool():
    """Weights after K-FAC's steps on a pooling CNN (one-sided differences, the forward for rho: no-grad forwards)
    equal, bit for bit, those of a twin whose forwards keep PyTorch's pool."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 12, 12), torch.randint(0, 3, (32,))
    weights = []
    for substitute in (True, False):
        torch.manual_seed(1)
        net = _pooling_net()
        net(x[:1])
        cm = kronograph.compile(net, (x[:2],), loss="cross_entropy")
        opt = kronograph.optim.KFAC(cm, seed=0)
        if not substitute:
            opt.engine.fast_pooling.pools = False
        for _ in range(4):
            opt.step(x, y)
        assert opt.engine.fast_pooling.pools is substitute
        weights.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
