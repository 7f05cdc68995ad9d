import pytest
import torch
import torch.nn.functional as F

from beautytag.nn.losses import LOGVAR_LIMIT, MultiTaskLoss, distillation_loss, shade_loss
from beautytag.schema import parse_schema

SCHEMA = parse_schema(
    [
        {"name": "cat", "kind": "single", "classes": ["a", "b", "c"], "weight": 2.0},
        {"name": "tags", "kind": "multi", "classes": ["x", "y"], "weight": 0.5},
        {"name": "shade", "kind": "shade"},
    ]
)


def batch(n=4):
    outputs = {"cat": torch.randn(n, 3), "tags": torch.randn(n, 2), "shade": torch.randn(n, 3)}
    targets = {
        "cat": torch.randint(0, 3, (n,)),
        "tags": torch.randint(0, 2, (n, 2)).float(),
        "shade": torch.randn(n, 3) * 20,
    }
    masks = {k: torch.ones(n, dtype=torch.bool) for k in outputs}
    return outputs, targets, masks


def test_unlabelled_samples_do_not_count():
    outputs, targets, masks = batch()
    masks["cat"] = torch.tensor([True, True, False, False])
    loss_fn = MultiTaskLoss(SCHEMA)
    total, parts = loss_fn(outputs, targets, masks)
    targets2 = {k: v.clone() for k, v in targets.items()}
    targets2["cat"][2:] = (targets["cat"][2:] + 1) % 3  # change only the masked labels
    total2, parts2 = loss_fn(outputs, targets2, masks)
    assert parts["cat"] == pytest.approx(parts2["cat"])
    assert float(total) == pytest.approx(float(total2))


def test_task_with_no_labels_is_left_out():
    outputs, targets, masks = batch()
    masks["shade"] = torch.zeros(4, dtype=torch.bool)
    _, parts = MultiTaskLoss(SCHEMA)(outputs, targets, masks)
    assert set(parts) == {"cat", "tags"}


def test_fixed_weights_are_the_schema_lambdas():
    outputs, targets, masks = batch()
    total, parts = MultiTaskLoss(SCHEMA)(outputs, targets, masks)
    expected = 2.0 * parts["cat"] + 0.5 * parts["tags"] + 1.0 * parts["shade"]
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_uncertainty_weighting_is_learned_and_bounded():
    outputs, targets, masks = batch()
    loss_fn = MultiTaskLoss(SCHEMA, weighting="uncertainty")
    total, parts = loss_fn(outputs, targets, masks)
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-5)  # s = 0 at start
    total.backward()
    assert all(p.grad is not None for p in loss_fn.log_vars.values())
    with torch.no_grad():
        loss_fn.log_vars["cat"].fill_(100.0)
    assert loss_fn.task_weights()["cat"] == pytest.approx(
        float(torch.exp(torch.tensor(-LOGVAR_LIMIT))), rel=1e-6
    )
    # past its bound a log-variance still has a gradient, so a task's weight can come back
    with torch.no_grad():
        loss_fn.log_vars["cat"].fill_(-1.2 * LOGVAR_LIMIT)
    loss_fn.zero_grad()
    loss_fn(outputs, targets, masks)[0].backward()
    assert float(loss_fn.log_vars["cat"].grad) != 0.0


def test_shade_loss_is_zero_when_right_and_grows_linearly():
    t = torch.tensor([[50.0, 10.0, 10.0]])
    assert float(shade_loss(t, t)) == 0.0
    near = float(shade_loss(t + torch.tensor([[10.0, 0, 0]]), t))
    far = float(shade_loss(t + torch.tensor([[40.0, 0, 0]]), t))
    assert near == pytest.approx(0.9, abs=0.05)
    assert far == pytest.approx(3.9, abs=0.05)  # robust: linear, not quadratic


def test_label_smoothing_and_class_weights_change_the_loss():
    outputs, targets, masks = batch(16)
    plain = MultiTaskLoss(SCHEMA)(outputs, targets, masks)[1]["cat"]
    smooth = MultiTaskLoss(SCHEMA, label_smoothing=0.2)(outputs, targets, masks)[1]["cat"]
    weighted = MultiTaskLoss(SCHEMA, class_weights={"cat": torch.tensor([5.0, 0.1, 0.1])})(
        outputs, targets, masks
    )[1]["cat"]
    assert plain != pytest.approx(smooth)
    assert plain != pytest.approx(weighted)
    # exactly PyTorch's cross-entropy with those settings (smoothing 0.2 towards uniform,
    # each sample weighted by its class's weight, the mean over the summed weights)
    y, t = outputs["cat"], targets["cat"]
    assert smooth == pytest.approx(float(F.cross_entropy(y, t, label_smoothing=0.2)), rel=1e-6)
    w = torch.tensor([5.0, 0.1, 0.1])
    by_hand = (w[t] * -torch.log_softmax(y, -1)[torch.arange(len(t)), t]).sum() / w[t].sum()
    assert weighted == pytest.approx(float(by_hand), rel=1e-5)


def test_distillation_pulls_every_output_to_the_teacher():
    """Gradient descent on the distillation loss alone makes the student's probabilities,
    tag probabilities and Lab those of the teacher; the loss is zero for class and shade
    outputs that already match (tags keep the teacher's entropy)."""
    torch.manual_seed(0)
    teacher, _, _ = batch(8)
    teacher["shade"] = teacher["shade"] * 20
    student = {k: torch.zeros_like(v, requires_grad=True) for k, v in teacher.items()}
    opt = torch.optim.Adam(student.values(), lr=0.1)
    for _ in range(800):
        opt.zero_grad()
        distillation_loss(SCHEMA, student, teacher, temperature=2.0).backward()
        opt.step()
    assert torch.allclose(student["cat"].softmax(-1), teacher["cat"].softmax(-1), atol=1e-3)
    assert torch.allclose(student["tags"].sigmoid(), teacher["tags"].sigmoid(), atol=1e-3)
    assert torch.allclose(student["shade"], teacher["shade"], atol=0.05)

    same = {k: teacher[k] for k in ("cat", "shade")}
    only = parse_schema(
        [
            {"name": "cat", "kind": "single", "classes": ["a", "b", "c"]},
            {"name": "shade", "kind": "shade"},
        ]
    )
    assert float(distillation_loss(only, same, teacher, temperature=2.0)) < 1e-6
    # by hand: T^2 KL(teacher || student) of the softmax at T (not the reverse direction)
    t_logits, s_logits = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    p, q = (t_logits / 2).softmax(-1), (s_logits / 2).softmax(-1)
    expected = 4 * float((p * (p / q).log()).sum())
    assert expected != pytest.approx(4 * float((q * (q / p).log()).sum()), rel=0.05)
    loss = distillation_loss(
        only,
        {"cat": s_logits, "shade": torch.zeros(1, 3)},
        {"cat": t_logits, "shade": torch.zeros(1, 3)},
        temperature=2.0,
    )
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_cutmix_loss_weighs_each_known_label_by_area_or_only_where_both_are_known():
    torch.manual_seed(0)
    outputs, targets, masks = batch(4)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    perm, lam = torch.tensor([1, 0, 3, 2]), 0.9
    masks["cat"] = torch.tensor([False, True, True, True])  # photo 0's category unknown
    loss_fn = MultiTaskLoss(SCHEMA)
    out = outputs["cat"]
    tags = F.binary_cross_entropy_with_logits(outputs["tags"], targets["tags"])
    tags_box = F.binary_cross_entropy_with_logits(outputs["tags"], targets["tags"][perm])
    shade = shade_loss(outputs["shade"], targets["shade"]).mean()
    shade_box = shade_loss(outputs["shade"], targets["shade"][perm]).mean()
    rest = lam * (0.5 * tags + shade) + (1 - lam) * (0.5 * tags_box + shade_box)
    # "area" (the default): each known label counts, weighing its part of the photo; photo 0
    # is trained towards its box's category (photo 1's), photo 1 not towards photo 0's
    loss, _ = loss_fn.mixed(outputs, targets, masks, perm, lam)
    own = F.cross_entropy(out[1:], targets["cat"][1:])
    box = F.cross_entropy(out[[0, 2, 3]], targets["cat"][perm][[0, 2, 3]])
    expected = lam * 2.0 * own + (1 - lam) * 2.0 * box + rest
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # "both": photos 0 and 1 (a pair with one category unknown) are not trained on category
    loss, _ = loss_fn.mixed(outputs, targets, masks, perm, lam, both=True)
    loss.backward()
    assert out.grad[:2].abs().max() == 0 and out.grad[2:].abs().min() > 0
    own = F.cross_entropy(out[2:], targets["cat"][2:])
    box = F.cross_entropy(out[2:], targets["cat"][perm][2:])
    expected = lam * 2.0 * own + (1 - lam) * 2.0 * box + rest
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
