"""The P-tuning prompt on a frozen tiny model: only the encoder trains, our forward prepends
exactly what PEFT's own forward prepends, and save/reload (PEFT adapter for inference, encoder
weights for resuming) gives identical logits."""
import pytest
import torch
from safetensors.torch import load_file

from utils.forward import gather_label_logits, label_logits
from tests.tiny import tiny_llama
from utils.prompt import (
    ENCODER_FILE,
    PROMPT_DIR,
    add_prompt,
    load_encoder_weights,
    load_prompt,
    prompt_embeddings,
    prompt_summary,
    save_prompt,
    trainable_parameters,
)
from utils.template import collate

P, H, D = 4, 8, 32


def batch():
    feats = [
        {"input_ids": [1, 5, 6, 7, 8], "label_ids": [8], "label": 1},
        {"input_ids": [1, 5, 9, 10, 11, 12, 13], "label_ids": [12, 13], "label": 0},
    ]
    return collate(feats, pad_id=0)


@pytest.fixture
def prompted():
    return add_prompt(tiny_llama(40, seed=0), P, H, seed=3)


def test_only_the_prompt_encoder_trains(prompted):
    trainable = {n for n, p in prompted.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
    summary = prompt_summary(prompted)
    # embedding p*d + MLP d->h->h->d with biases
    want = P * D + (D * H + H) + (H * H + H) + (H * D + D)
    assert summary["trainable_params"] == want == sum(p.numel() for p in trainable_parameters(prompted))
    assert summary["num_virtual_tokens"] == P and summary["encoder_hidden_size"] == H and summary["token_dim"] == D
    emb = prompt_embeddings(prompted)
    assert emb.shape == (P, D) and emb.requires_grad
    label_logits(prompted, batch(), emb).sum().backward()
    assert all(p.grad is not None for p in trainable_parameters(prompted))
    assert all(p.grad is None for n, p in prompted.named_parameters() if not n.startswith("prompt_encoder."))


def test_initialisation_is_seeded():
    a = prompt_embeddings(add_prompt(tiny_llama(40, seed=0), P, H, seed=3))
    b = prompt_embeddings(add_prompt(tiny_llama(40, seed=0), P, H, seed=3))
    c = prompt_embeddings(add_prompt(tiny_llama(40, seed=0), P, H, seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_label_logits_match_pefts_own_forward(prompted):
    prompted.eval()
    b = batch()
    with torch.no_grad():
        ours = label_logits(prompted, b, prompt_embeddings(prompted))
        full = prompted(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert full.shape[1] == P + b["input_ids"].shape[1]
    assert torch.allclose(ours, gather_label_logits(full, b["label_pos"], P), atol=1e-5)


def test_save_reload_gives_identical_logits(prompted, tmp_path):
    prompted.eval()
    b = batch()
    with torch.no_grad():
        emb = prompt_embeddings(prompted)
        before = label_logits(prompted, b, emb)
    save_prompt(prompted, tmp_path)
    saved = load_file(str(tmp_path / PROMPT_DIR / "adapter_model.safetensors"))
    assert torch.equal(saved["prompt_embeddings"], emb)  # PEFT stored exactly the encoder's output
    peft_model, prompt = load_prompt(tiny_llama(40, seed=0), tmp_path)
    assert not prompt.requires_grad and torch.equal(prompt, emb)
    with torch.no_grad():
        after = label_logits(peft_model, b, prompt)
        pefts_own = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(before, after)
    assert torch.allclose(after, gather_label_logits(pefts_own, b["label_pos"], P), atol=1e-5)


def test_encoder_weights_resume_training_state(prompted, tmp_path):
    save_prompt(prompted, tmp_path)
    assert (tmp_path / ENCODER_FILE).is_file()
    fresh = add_prompt(tiny_llama(40, seed=0), P, H, seed=99)
    assert not torch.equal(prompt_embeddings(fresh), prompt_embeddings(prompted))
    load_encoder_weights(fresh, tmp_path)
    assert torch.equal(prompt_embeddings(fresh), prompt_embeddings(prompted))
    assert all(p.requires_grad for p in trainable_parameters(fresh))
    other = add_prompt(tiny_llama(40, seed=0), P + 1, H, seed=0)
    with pytest.raises(ValueError, match=ENCODER_FILE):
        load_encoder_weights(other, tmp_path)
