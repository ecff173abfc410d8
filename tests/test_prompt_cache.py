"""The prompt key/value cache (``utils.forward.PromptCache``): the same logits and prompt
gradient as prepending the prompt to every row, on padded batches; never mutated by the
batches that use it; used by evaluation and by the SPUL training step."""
import numpy as np
import pytest
import torch

from utils.evaluation import predict
from utils.forward import PromptCache, cache_compatible, full_logits_at_labels, label_logits
from tests.tiny import tiny_llama
from utils.prompt import add_prompt, prompt_embeddings, trainable_parameters
from utils.spul_loss import SpulObjective
from utils.template import collate

V, D, P = 48, 32, 5


def features():
    """Rows of different lengths (right padding), one- and two-token labels, forget and retain."""
    return [
        {"input_ids": [1, 5, 6, 7, 8], "label_ids": [8], "label": 1, "is_forget": False},
        {"input_ids": [1, 5, 9, 10, 11, 12, 13, 14, 15], "label_ids": [14, 15], "label": 0, "is_forget": True},
        {"input_ids": [1, 5, 16, 17], "label_ids": [17], "label": 1, "is_forget": False},
        {"input_ids": [1, 20, 21, 22, 23, 24, 25], "label_ids": [25], "label": 0, "is_forget": False},
    ]


def padded_batch(rows=None):
    feats = features()
    batch = collate([feats[i] for i in (rows or range(len(feats)))], pad_id=0)
    assert (batch["attention_mask"] == 0).any()  # the test needs padding
    return batch


@pytest.fixture
def model():
    return tiny_llama(V, seed=0).eval()


@pytest.fixture
def prompt():
    g = torch.Generator().manual_seed(1)
    return torch.randn(P, D, generator=g)


def test_cached_logits_equal_the_plain_forward_with_the_prompt(model, prompt):
    batch = padded_batch()
    with torch.no_grad():
        plain = label_logits(model, batch, prompt)
        naive = full_logits_at_labels(model, batch, prompt)  # the model's own full forward
        cache = PromptCache.build(model, prompt)
        cached = label_logits(model, batch, prompt_cache=cache)
        no_prompt = label_logits(model, batch)
    assert cache.length == P
    assert cached.shape == plain.shape == (4, 2, V)
    assert torch.allclose(cached, plain, atol=1e-4, rtol=0)
    assert torch.allclose(cached, naive, atol=1e-4, rtol=0)
    assert not torch.allclose(cached, no_prompt, atol=1e-3)  # the cache does carry the prompt


def test_cache_is_reused_across_batches_without_being_mutated(model, prompt):
    with torch.inference_mode():
        cache = PromptCache.build(model, prompt)
        stored = [(k.clone(), v.clone()) for k, v in cache.layers]
        first = label_logits(model, padded_batch(), prompt_cache=cache)
        other = label_logits(model, padded_batch([1, 2]), prompt_cache=cache)  # another batch size
        again = label_logits(model, padded_batch(), prompt_cache=cache)
        want_other = label_logits(model, padded_batch([1, 2]), prompt)
    assert torch.equal(first, again)
    assert torch.allclose(other, want_other, atol=1e-4, rtol=0)
    for (k, v), (k0, v0) in zip(cache.layers, stored):
        assert k.shape == (1, model.config.num_key_value_heads, P, k.size(-1)) and torch.equal(k, k0) and torch.equal(v, v0)
    with pytest.raises(ValueError, match="either prompt or prompt_cache"):
        label_logits(model, padded_batch(), prompt, prompt_cache=cache)


def test_gradient_through_the_cache_equals_the_plain_gradient(prompt):
    model = tiny_llama(V, seed=0).train().requires_grad_(False)  # frozen, as in SPUL
    batch = padded_batch()
    grads = []
    for use_cache in (False, True):
        p = prompt.clone().requires_grad_(True)
        logits = label_logits(model, batch, prompt_cache=PromptCache.build(model, p)) if use_cache else label_logits(model, batch, p)
        torch.log_softmax(logits, -1)[..., 3].sum().backward()
        grads.append(p.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_spul_objective_with_and_without_cache_agree():
    peft_model = add_prompt(tiny_llama(V, seed=0), P, 8, seed=3).train()
    batch = padded_batch()
    out = []
    for use_cache in (False, True):
        objective = SpulObjective(prompt_embeddings, alpha=1.0, beta=0.5, prompt_cache=use_cache)
        loss, terms = objective(peft_model, batch)
        loss.backward()
        out.append((terms, [p.grad.clone() for p in trainable_parameters(peft_model)]))
        peft_model.zero_grad(set_to_none=True)
    (t0, g0), (t1, g1) = out
    for name in ("L_f", "L_r", "L_kl", "loss"):
        assert t1[name] == pytest.approx(t0[name], rel=1e-4, abs=1e-6)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-3)


def test_cache_built_after_a_fixed_prefix_equals_the_joined_build(model, prompt):
    fixed = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        joined = PromptCache.build(model, torch.cat([fixed, prompt]))
        past = PromptCache.build(model, fixed)
        stacked = PromptCache.build(model, prompt, past=past)
        want = label_logits(model, padded_batch(), torch.cat([fixed, prompt]))
        got = label_logits(model, padded_batch(), prompt_cache=stacked)
    assert stacked.length == joined.length == 3 + P and past.length == 3
    for (k, v), (k0, v0) in zip(stacked.layers, joined.layers):
        assert k.shape == k0.shape and torch.allclose(k, k0, atol=1e-5) and torch.allclose(v, v0, atol=1e-5)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert all(k.size(2) == 3 for k, _ in past.layers)  # building on it left the prefix's cache as it was


def test_spul_objective_caches_a_fixed_prefix_once_with_the_joined_loss_and_gradient():
    peft_model = add_prompt(tiny_llama(V, seed=0), P, 8, seed=3).train()
    fixed = torch.randn(4, D, generator=torch.Generator().manual_seed(5))
    batch = padded_batch()
    out = []
    joined = SpulObjective(lambda m: torch.cat([fixed, prompt_embeddings(m)]), alpha=1.0, beta=0.5, prompt_cache=False)
    prepended = SpulObjective(prompt_embeddings, alpha=1.0, beta=0.5, prompt_cache=False, fixed_prefix=fixed)
    cached = SpulObjective(prompt_embeddings, alpha=1.0, beta=0.5, fixed_prefix=fixed)
    no_prefix = SpulObjective(prompt_embeddings, alpha=1.0, beta=0.5)
    for objective in (joined, prepended, cached, cached, no_prefix):
        loss, terms = objective(peft_model, batch)
        loss.backward()
        out.append((terms, [p.grad.clone() for p in trainable_parameters(peft_model)]))
        peft_model.zero_grad(set_to_none=True)
    assert cached.prefix_builds == 1 and prepended.prefix_builds == 0  # one build for both steps
    (t0, g0) = out[0]
    for t, g in out[1:4]:
        for name in ("L_f", "L_r", "L_kl", "loss"):
            assert t[name] == pytest.approx(t0[name], rel=1e-4, abs=1e-6)
        for a, b in zip(g0, g):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-3)
    assert out[4][0]["loss"] != pytest.approx(t0["loss"], rel=1e-3)  # the prefix does change the step


def test_spul_objective_rebuilds_the_prefix_cache_when_the_model_drops_activations():
    model = tiny_llama(V, seed=0)
    peft_model = add_prompt(model, P, 8, seed=3).train()
    model.model.layers[0].self_attn.attention_dropout = 0.1
    model.config.attention_dropout = 0.1
    objective = SpulObjective(prompt_embeddings, alpha=1.0, beta=0.0, fixed_prefix=torch.zeros(2, D))
    for _ in range(2):
        objective(peft_model, padded_batch())
    assert objective.prefix_builds == 2


def test_activation_checkpointing_falls_back_to_prepending(prompt):
    model = tiny_llama(V, seed=0).requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert not cache_compatible(model)
    with pytest.raises(ValueError, match="checkpointing"):
        label_logits(model, padded_batch(), prompt_cache=PromptCache.build(model, prompt))
    p = prompt.clone().requires_grad_(True)
    loss, _ = SpulObjective(lambda m: p, 1.0, 0.0)(model, padded_batch())  # prepends instead
    loss.backward()
    assert p.grad.abs().sum() > 0
    assert cache_compatible(model.eval())


def test_predict_with_a_prompt_uses_the_cache_and_matches_the_plain_path(model, prompt, monkeypatch):
    feats = features() * 3
    builds = []
    real_build = PromptCache.build.__func__
    monkeypatch.setattr(PromptCache, "build", classmethod(lambda cls, m, p: builds.append(1) or real_build(cls, m, p)))
    preds = predict(model, feats, 4, "cpu", 0, prompt=prompt, task_ids=[8, 9])
    pred, restricted = preds.ids, preds.restricted
    assert builds == [1]  # once for the whole split, not per batch
    with torch.no_grad():
        logits = label_logits(model, collate(feats, 0), prompt)[:, 0]
    assert np.array_equal(pred, logits.argmax(-1).numpy())
    assert np.array_equal(restricted, logits[:, [8, 9]].argmax(-1).numpy())
    assert np.allclose(preds.label_logprobs, torch.log_softmax(logits, -1)[:, [8, 9]].double().numpy(), atol=1e-6)


def test_reference_hidden_cache_gives_the_on_the_fly_reference():
    """The reference cache: same loss terms as the on-the-fly reference, a forward only on
    the first visit of a sample, d floats per label position kept."""
    peft_model = add_prompt(tiny_llama(V, seed=0), P, 8, seed=3).train()
    on_the_fly = SpulObjective(prompt_embeddings, alpha=1.0, beta=1.0)
    cached = SpulObjective(prompt_embeddings, alpha=1.0, beta=1.0, reference_cache=True)
    first, second = padded_batch(), padded_batch([3, 2, 0])  # second: the same samples, another batch
    for batch in (first, second, first):
        _, want = on_the_fly(peft_model, batch)
        _, got = cached(peft_model, batch)
        for name in ("L_kl", "loss"):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-7)
    cost = cached.cost()
    assert cost["reference_cache_misses"] == 3 and cost["reference_cache_hits"] == 6  # 3 retain rows
    labels = 1 + 1 + 1  # label tokens of the retain rows (features 0, 2, 3)
    assert cost["bytes_kept_between_steps"] == labels * D * 4
    assert on_the_fly.cost()["bytes_kept_between_steps"] == 0


def test_spul_cache_reference_flag_trains_the_same_prompt(tiny_model_dir, tiny_data_args, tmp_path):
    """spul.py caches the reference by default (--cache_reference still accepted): the same
    prompt and metrics as the on-the-fly reference (--no_cache_reference) over two epochs, with
    the second epoch served from the cache."""
    import json

    from safetensors.torch import load_file

    import spul

    args = ["--model_name", tiny_model_dir, "--num_epochs", "2", "--train_batch_size", "8", "--lr", "1e-2", "--beta", "1",
            "--ptuning_num_tokens", "4", "--ptuning_hidden_size", "16", *tiny_data_args]
    spul.main(args + ["--no_cache_reference", "--output_path", str(tmp_path / "plain")])
    spul.main(args + ["--output_path", str(tmp_path / "cached")])
    spul.main(args + ["--cache_reference", "--output_path", str(tmp_path / "flag")])
    prompts = [load_file(str(tmp_path / r / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"] for r in ("plain", "cached", "flag")]
    assert torch.allclose(prompts[0], prompts[1], atol=1e-4)
    assert torch.equal(prompts[1], prompts[2])  # the flag names the default
    stats = json.loads((tmp_path / "cached" / "train_stats.json").read_text())["kl_reference"]
    assert stats["reference_cache_hits"] > 0 and stats["reference_cache_misses"] > 0 and stats["bytes_kept_between_steps"] > 0
    plain = json.loads((tmp_path / "plain" / "train_stats.json").read_text())["kl_reference"]
    assert plain["bytes_kept_between_steps"] == 0 and plain["reference_cache_hits"] is None


def test_spul_turns_the_reference_cache_off_on_a_model_with_dropout(tmp_path, tiny_data_args, capsys):
    """A frozen model with attention dropout: its reference changes between visits, so the
    cache would freeze one draw; spul.py says so in one line and computes it on the fly."""
    import json

    import spul
    from tests.tiny import save_tiny_model
    from utils.spul_loss import has_dropout

    assert not has_dropout(tiny_llama(V)) and has_dropout(tiny_llama(V, attention_dropout=0.1))
    folder = save_tiny_model(tmp_path / "dropout", attention_dropout=0.1)
    spul.main(["--model_name", folder, "--num_epochs", "2", "--train_batch_size", "8", "--ptuning_num_tokens", "4",
               "--ptuning_hidden_size", "16", *tiny_data_args, "--output_path", str(tmp_path / "run")])
    assert "note: reference cache off" in capsys.readouterr().out
    stats = json.loads((tmp_path / "run" / "train_stats.json").read_text())["kl_reference"]
    assert stats["reference_cache_hits"] is None and stats["bytes_kept_between_steps"] == 0
