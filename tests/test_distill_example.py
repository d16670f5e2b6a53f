"""examples/distill_smollm2.py's student: which teacher layers it starts from, and that it is
those layers (a tiny Llama teacher built from a config; the real run is the example itself)."""

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
distill = pytest.importorskip("distill_smollm2")


def test_student_layers_rules():
    assert distill.student_layers(30, "alternate") == list(range(0, 30, 2))
    assert distill.student_layers(30, "ends") == [*range(7), *range(22, 30)]
    for n in (1, 2, 5, 7, 30):
        for rule in ("alternate", "ends"):
            keep = distill.student_layers(n, rule)
            assert len(keep) == (n + 1) // 2 and keep == sorted(set(keep))
            assert all(0 <= i < n for i in keep)
        assert distill.student_layers(n, "ends")[-1] == n - 1  # the last layer is kept
    with pytest.raises(ValueError, match="'alternate' or 'ends'"):
        distill.student_layers(30, "random")


@pytest.mark.parametrize("rule", ["alternate", "ends"])
def test_student_is_the_teacher_with_only_the_kept_layers(rule):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    student = distill.make_student(teacher, rule).eval()
    keep = distill.student_layers(6, rule)
    assert student.config.num_hidden_layers == len(keep)
    # the teacher with the other layers removed computes what the student does
    pruned = distill.copy.deepcopy(teacher)
    pruned.model.layers = torch.nn.ModuleList([pruned.model.layers[j] for j in keep])
    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = i
    pruned.config.num_hidden_layers = len(keep)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, pruned(ids).logits)
    # the tied embedding / head is frozen, the layers train
    assert not student.lm_head.weight.requires_grad
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert all(p.requires_grad for p in student.model.layers.parameters())
