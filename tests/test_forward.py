"""Label-position logits equal the model's own full forward, with and without a prompt."""
import torch

from utils.forward import full_logits_at_labels, label_logits
from tests.tiny import tiny_llama
from utils.template import collate


def batch():
    feats = [
        {"input_ids": [1, 5, 6, 7, 8], "label_ids": [8], "label": 1},
        {"input_ids": [1, 5, 9, 10, 11, 12, 13], "label_ids": [12, 13], "label": 0},
    ]
    return collate(feats, pad_id=0)


def test_label_logits_match_full_forward_without_prompt():
    model = tiny_llama(32, seed=0).eval()
    b = batch()
    with torch.no_grad():
        fast, naive = label_logits(model, b), full_logits_at_labels(model, b)
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert fast.shape == (2, 2, 32)
    assert torch.allclose(fast, naive, atol=1e-5)
    # sample 1, second label token (id 13 at index 6) is predicted by index 5
    assert torch.allclose(fast[1, 1], ref[1, 5], atol=1e-5)


def test_label_logits_with_prompt_offset_by_p():
    model = tiny_llama(32, seed=0).eval()
    b = batch()
    prompt = torch.randn(3, 32)
    with torch.no_grad():
        fast = label_logits(model, b, prompt)
        emb = model.get_input_embeddings()(b["input_ids"])
        full = model(inputs_embeds=torch.cat([prompt.expand(2, -1, -1), emb], 1),
                     attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), b["attention_mask"]], 1)).logits
        no_prompt = label_logits(model, b)
    assert torch.allclose(fast[0, 0], full[0, 3 + 3], atol=1e-5)  # label_pos 3 + p 3
    assert torch.allclose(fast, full_logits_at_labels(model, b, prompt), atol=1e-5)
    assert not torch.allclose(fast, no_prompt, atol=1e-3)
