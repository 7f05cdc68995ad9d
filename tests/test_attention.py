import torch

from beautytag.attention import CBAM, SeedAttention, create_attention


def test_seed_attention_follows_the_design_formulas():
    x = torch.rand(2, 8, 5, 4) * 6
    fc = x * torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))
    fs = x * torch.sigmoid(x.amax(dim=1, keepdim=True) + x.mean(dim=1, keepdim=True))
    out = SeedAttention()(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, fc * fs)
    assert not list(SeedAttention().parameters())


def test_cbam_starts_as_identity_and_learns():
    x = torch.randn(3, 32, 6, 6)
    cbam = CBAM(32)
    torch.testing.assert_close(cbam(x), x)
    loss = (cbam(x) * torch.randn_like(x)).sum()
    loss.backward()
    grads = [p.grad for p in cbam.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_cbam_gates_change_the_features_once_trained():
    x = torch.randn(2, 16, 4, 4)
    cbam = CBAM(16)
    torch.nn.init.normal_(cbam.spatial.conv.weight)
    out = cbam(x)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)


def test_create_attention():
    x = torch.randn(1, 16, 3, 3)
    assert torch.equal(create_attention("none", 16)(x), x)
    assert isinstance(create_attention("seed", 16), SeedAttention)
    assert isinstance(create_attention("cbam", 16), CBAM)
