import torch

from beautytag.nn.attention import CBAM, SeedAttention, create_attention


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


def test_cbam_follows_woo_et_al_formulas():
    """M_c = 2 sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))), F' = F * M_c;
    M_s = 2 sigmoid(conv7x7([mean_c(F'), max_c(F')])), out = F' * M_s (the factor 2 makes the
    zero-initialised gates the identity)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 5)
    cbam = CBAM(16)
    for p in cbam.parameters():
        torch.nn.init.normal_(p, std=0.3)
    w1, b1 = cbam.channel.mlp[0].weight[:, :, 0, 0], cbam.channel.mlp[0].bias
    w2, b2 = cbam.channel.mlp[2].weight[:, :, 0, 0], cbam.channel.mlp[2].bias

    def mlp(v: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, C), the shared MLP
        return torch.relu(v @ w1.T + b1) @ w2.T + b2

    gate_c = 2 * torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))
    f = x * gate_c[:, :, None, None]
    maps = torch.stack([f.mean(dim=1), f.amax(dim=1)], 1)
    conv = torch.nn.functional.conv2d(
        maps, cbam.spatial.conv.weight, cbam.spatial.conv.bias, padding=3
    )
    with torch.no_grad():
        torch.testing.assert_close(cbam(x), f * 2 * torch.sigmoid(conv))
