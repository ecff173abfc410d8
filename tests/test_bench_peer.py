"""bench.py's release-style SPUL peer and its --profile, on the tiny model: the release-style
step (PEFT's own forward, full logits, reference logits precomputed by a model copy) computes
SpulObjective's loss and prompt gradient; the profile's categories add up to its wall time."""
import copy
import json

import pytest
import torch

import bench
from utils.forward import unwrap
from utils.models import load_model, load_tokenizer
from utils.prompt import add_prompt, prompt_embeddings, trainable_parameters
from utils.spul_loss import SpulObjective
from utils.template import collate


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model, _ = load_model(tiny_model_dir, torch.device("cpu"), tokenizer=tokenizer)
    return model, tokenizer


def features(vocab: int, seed: int = 0) -> list[dict]:
    """Rows of different lengths, some with two label tokens (so that K > 1 and label rows are
    padded), forget and retain mixed; each with its ``index`` (the release's cache key)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (n, k, forget) in enumerate([(9, 1, False), (14, 2, True), (6, 1, False), (11, 2, False), (8, 1, True), (12, 1, False)]):
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "label_ids": ids[n - k:], "is_forget": forget, "label": i % 2, "index": 100 + i})
    return rows


def losses_and_grads(loss_fn, model, batch):
    params = trainable_parameters(model)
    for p in params:
        p.grad = None
    loss, terms = loss_fn(model, batch)
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return loss.item(), terms, grads


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (0.5, 2.0), (1.0, 0.0)])
@pytest.mark.parametrize("prompt_cache", [True, False])
def test_release_style_step_computes_spul_loss_and_gradient(tiny, alpha, beta, prompt_cache):
    base, tokenizer = tiny
    model = add_prompt(copy.deepcopy(base), num_tokens=4, hidden_size=16, seed=3)
    feats = features(base.config.vocab_size)
    batch = collate(feats, tokenizer.pad_token_id)
    assert batch["label_ids"].size(1) == 2 and (batch["attention_mask"] == 0).any()

    release = bench.ReleaseStyleSpul(alpha, beta)
    reference_copy = copy.deepcopy(unwrap(model))
    release.precompute(reference_copy, feats, batch_size=4, device=torch.device("cpu"), pad_id=tokenizer.pad_token_id)
    assert set(release.rows) == {f["index"] for f in feats}
    assert release.nbytes == sum(len(f["label_ids"]) for f in feats) * base.config.vocab_size * 4

    model.train()
    spul_loss, spul_terms, spul_grads = losses_and_grads(SpulObjective(prompt_embeddings, alpha, beta, prompt_cache=prompt_cache), model, batch)
    rel_loss, rel_terms, rel_grads = losses_and_grads(release, model, batch)
    assert abs(rel_loss - spul_loss) < 1e-5
    for name in ("L_f", "L_r", "L_kl"):
        assert abs(rel_terms[name] - spul_terms[name]) < 1e-5, name
    if beta:
        assert spul_terms["L_kl"] > 0  # the prompt moves the retain distribution: the KL term is exercised
    assert len(rel_grads) == len(spul_grads) > 0
    for a, b in zip(rel_grads, spul_grads):
        assert (a - b).abs().max().item() < 1e-5
    assert max(g.abs().max().item() for g in spul_grads) > 1e-4  # a real gradient, not zeros


def test_release_style_reference_is_the_no_prompt_model(tiny):
    """The cached rows are the copy's no-prompt logits at the label-predicting positions."""
    base, tokenizer = tiny
    model = add_prompt(copy.deepcopy(base), num_tokens=4, hidden_size=16, seed=3)
    feats = features(base.config.vocab_size, seed=1)
    release = bench.ReleaseStyleSpul(1.0, 1.0)
    release.precompute(copy.deepcopy(unwrap(model)), feats, batch_size=3, device=torch.device("cpu"), pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        for f in feats:
            ids = torch.tensor([f["input_ids"]])
            logits = base(input_ids=ids).logits[0]
            k = len(f["label_ids"])
            want = logits[len(f["input_ids"]) - k - 1: len(f["input_ids"]) - 1]
            assert torch.allclose(release.rows[f["index"]], want, atol=1e-5)


def test_profile_categories_add_up(tiny_model_dir, tiny_data_args, tmp_path):
    out = tmp_path / "profile.json"
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--model_name", tiny_model_dir, *tiny_data_args, "--batch_size", "4", "--profile_baseline_batch_size", "6",
                              "--threads", "1", "--profile", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert set(saved["workloads"]) == {"SPUL step", "GA+GD step", "evaluation forward"}
    assert saved["workloads"]["SPUL step"]["batch_size"] == 4 and saved["workloads"]["GA+GD step"]["batch_size"] == 6
    assert saved["workloads"]["evaluation forward"]["batch_size"] == 8  # --eval_batch_size of the tiny data args
    for name, w in saved["workloads"].items():
        cats = w["categories"]
        assert set(cats) == set(bench.CATEGORIES)
        total = sum(c["ms"] for c in cats.values())
        assert abs(total - w["wall_ms"]) <= 0.01 * w["wall_ms"], name
        assert abs(sum(c["percent"] for c in cats.values()) - 100) <= 1, name
        # self times count every recorded microsecond once: their sum is the root events' time
        assert abs(w["events_self_ms"] - w["root_events_ms"]) <= 0.01 * w["root_events_ms"], name
        assert w["events_self_ms"] <= w["wall_ms"] * 1.01, name
        assert cats["matmul"]["ms"] > 0 and cats["lm_head"]["ms"] > 0 and cats["attention"]["ms"] > 0 and cats["norm"]["ms"] > 0, name
        assert all(c["ms"] >= 0 for k, c in cats.items() if k != "overhead"), name
    for name in ("SPUL step", "GA+GD step"):
        assert saved["workloads"][name]["categories"]["optimizer"]["ms"] > 0
    assert saved["workloads"]["evaluation forward"]["categories"]["optimizer"]["ms"] == 0
    table = out.with_suffix(".md").read_text()
    assert "| matmul |" in table and "| overhead |" in table and "SPUL step" in table
    assert results["workloads"].keys() == saved["workloads"].keys()
