"""Label and text tokens come from the whole rendered string, under the three tokenizer kinds
the toolkit meets: SentencePiece with LLaMA-2's word-start marker, byte-level BPE (SmolLM2,
OPT) and the tiny WordPiece of the tests; and the label check that runs before training."""
import pytest

from utils import cli
from utils.models import embedded_model_dir, is_converted, load_tokenizer
from tests.tiny import tiny_tokenizer
from utils.template import Encoder, check_labels
from utils.task import SENTIMENT

GENERIC_LABELS = SENTIMENT.generic_labels
LABEL_WORDS = SENTIMENT.label_words
PREFIX = SENTIMENT.prefix
SUFFIX = SENTIMENT.suffix
render = SENTIMENT.render

ALL_WORDS = LABEL_WORDS + GENERIC_LABELS
TEXTS = ["a fine film", "Good.", "dull  ", "  two leading spaces", "x"]
LONG = " ".join(["a long and rather tedious evening out"] * 40)


def plain(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def old_encode(tok, text, word):
    """How the Encoder used to build an example: each part tokenised on its own."""
    bos = tok("", add_special_tokens=True)["input_ids"]
    return bos + plain(tok, PREFIX) + plain(tok, text) + plain(tok, SUFFIX) + plain(tok, " " + word)


def assert_full_string_ids(tok, enc):
    for text in TEXTS:
        for word in ALL_WORDS:
            ids, lab = enc.encode(text, word)
            assert ids == tok(render(text, word))["input_ids"], (text, word)
            assert ids[-len(lab):] == lab == enc.label_ids(word)


def assert_truncation_keeps_template_and_label(tok, max_length, word="negative"):
    """The truncated ids are the full string's with the tail of the text's tokens removed."""
    full, lab = Encoder(tok, 10_000).encode(LONG, word)
    enc = Encoder(tok, max_length)
    ids, lab2 = enc.encode(LONG, word)
    assert lab2 == lab and len(ids) == max_length
    tail = len(enc._suffix) + len(lab)
    head = len(enc._bos) + len(enc._prefix)
    assert ids[-tail:] == full[-tail:]  # the suffix and the label
    assert ids[:-tail] == full[: len(ids) - tail]  # the front, the prefix and the text's first tokens
    assert len(ids) - tail > head  # at least one text token survived
    return ids


# ---------------------------------------------------------------------------------------------
# SentencePiece with LLaMA-2's normaliser: a word-start marker prepended, spaces replaced by it
# ---------------------------------------------------------------------------------------------

SP_WORDS = ["###", "Text", "Question", "What", "is", "the", "sentiment", "of", "given", "text", "Sentiment",
            "positive", "negative", "neutral", "unknown", "a", "fine", "film", "long", "and", "rather",
            "tedious", "evening", "out", "two", "leading", "spaces", "dull", "Good"]
SP_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!#'\n-"


def sentencepiece_tokenizer(extra_pieces=(), words=SP_WORDS):
    """A LLaMA-2-like tokenizer: a Unigram model over whole ``▁word`` pieces, single characters
    and byte-fallback pieces, LLaMA-2's normaliser (``▁`` prepended, spaces become ``▁``), its
    decoder, and a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    vocab += [("▁", -4.0)] + [("▁" + w, -3.0) for w in words] + [(c, -6.0) for c in SP_CHARS]
    vocab += [(piece, -1.0) for piece in extra_pieces]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def sp():
    return sentencepiece_tokenizer()


def test_sentencepiece_label_alone_starts_with_a_lone_marker(sp):
    # the old way: every label's first token was the same lone "▁"
    alone = {w: sp.convert_ids_to_tokens(plain(sp, " " + w)) for w in LABEL_WORDS}
    assert alone == {"negative": ["▁", "▁negative"], "positive": ["▁", "▁positive"]}
    firsts = {old_encode(sp, "a fine film", w)[-2] for w in LABEL_WORDS}
    assert len(firsts) == 1


def test_sentencepiece_label_ids_are_the_single_in_context_token(sp):
    enc = Encoder(sp, 512)
    for word in ALL_WORDS:
        assert enc.label_ids(word) == [sp.convert_tokens_to_ids("▁" + word)]
    assert enc.label_ids("positive") != enc.label_ids("negative")
    check_labels(enc, ALL_WORDS)


def test_sentencepiece_encode_is_the_full_string(sp):
    enc = Encoder(sp, 512)
    assert_full_string_ids(sp, enc)
    ids, _ = enc.encode("a fine film", "positive")
    pieces = sp.convert_ids_to_tokens(ids)
    assert pieces[:5] == ["<s>", "▁###", "▁Text", ":", "▁a"]  # no lone "▁" before the text
    assert pieces[-3:] == ["▁Sentiment", ":", "▁positive"]
    assert "▁" not in pieces


@pytest.mark.parametrize("max_length", [40, 41, 60])
def test_sentencepiece_truncation_keeps_template_and_label(sp, max_length):
    ids = assert_truncation_keeps_template_and_label(sp, max_length)
    assert sp.decode(ids, skip_special_tokens=True).endswith(SUFFIX + " negative")


def test_truncation_never_splits_a_character(sp):
    """'é' falls back to two byte pieces with the same offsets: a cut keeps both or neither."""
    text = "a" + " é" * 30
    full, _ = Encoder(sp, 10_000).encode(text, "positive")
    assert sp.convert_ids_to_tokens(full).count("<0xC3>") == 30
    lengths = set()
    for max_length in range(32, 52):
        ids, _ = Encoder(sp, max_length).encode(text, "positive")
        lengths.add(max_length - len(ids))
        pieces = sp.convert_ids_to_tokens(ids)
        assert pieces.count("<0xC3>") == pieces.count("<0xA9>")  # whole characters only
        assert "\ufffd" not in sp.decode(ids) and sp.decode(ids).endswith(SUFFIX + " positive")
    assert lengths == {0, 1}  # one token short where the budget ends inside a character


def test_a_token_straddling_text_and_suffix_stays_with_the_suffix():
    """With a ".\n" piece, a text ending in "." shares a token with the suffix's first newline:
    that token belongs to the suffix and survives truncation."""
    tok = sentencepiece_tokenizer(extra_pieces=[".\n"])
    text = LONG + "."
    full = tok(render(text, "positive"), return_offsets_mapping=True)
    text_end = len(PREFIX) + len(text)
    first = next(i for i, (_, end) in enumerate(full["offset_mapping"]) if end > text_end)
    assert full["offset_mapping"][first][0] < text_end and tok.convert_ids_to_tokens(full["input_ids"][first]) == ".\n"
    assert Encoder(tok, 10_000).encode(text, "positive")[0] == full["input_ids"]
    ids, _ = Encoder(tok, 50).encode(text, "positive")
    kept = full["input_ids"][first:]
    assert len(ids) == 50 and ids[-len(kept):] == kept
    assert tok.decode(ids, skip_special_tokens=True).endswith("." + SUFFIX + " positive")


def test_a_merge_across_the_label_boundary_is_an_error():
    tok = sentencepiece_tokenizer(extra_pieces=[":▁positive"])  # ":" and " positive" become one token
    enc = Encoder(tok, 512)
    with pytest.raises(ValueError, match="'positive'"):
        enc.label_ids("positive")
    with pytest.raises(ValueError, match="'positive'"):
        enc.encode("a fine film", "positive")
    with pytest.raises(ValueError, match="'positive'"):
        check_labels(enc, LABEL_WORDS)
    assert enc.encode("a fine film", "negative")[1] == [tok.convert_tokens_to_ids("▁negative")]


# ---------------------------------------------------------------------------------------------
# Byte-level BPE (SmolLM2, OPT)
# ---------------------------------------------------------------------------------------------


def byte_level_tokenizer():
    """A small byte-level BPE trained here on template strings, OPT-like: ``</s>`` in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [render(t, w) for t in TEXTS + [LONG] for w in ALL_WORDS] * 3
    backend.train_from_iterator(corpus, trainer)
    eos = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>")


def smollm2_tokenizer():
    folder = embedded_model_dir("smollm2-135m")
    if not is_converted(folder):
        pytest.skip("embedded model not converted yet")
    return load_tokenizer(str(folder))


@pytest.fixture(scope="module", params=["trained_byte_level", "smollm2"])
def bbpe(request):
    return byte_level_tokenizer() if request.param == "trained_byte_level" else smollm2_tokenizer()


def test_byte_level_first_text_word_keeps_its_leading_space_form(bbpe):
    # the old way: the prefix's trailing space became its own token and "a" lost its "Ġ"
    old = bbpe.convert_ids_to_tokens(old_encode(bbpe, "a fine film", "positive"))
    assert "Ġ" in old and "a" in old
    enc = Encoder(bbpe, 512)
    ids, _ = enc.encode("a fine film", "positive")
    pieces = bbpe.convert_ids_to_tokens(ids)
    assert pieces[len(enc._bos) + len(enc._prefix)] == "Ġa"
    assert "Ġ" not in pieces
    assert ids != old_encode(bbpe, "a fine film", "positive")


def test_byte_level_encode_is_the_full_string(bbpe):
    enc = Encoder(bbpe, 512)
    assert_full_string_ids(bbpe, enc)
    assert bbpe.convert_ids_to_tokens(enc.label_ids("positive")) == ["Ġpositive"]
    check_labels(enc, ALL_WORDS)


@pytest.mark.parametrize("max_length", [40, 64])
def test_byte_level_truncation_keeps_template_and_label(bbpe, max_length):
    ids = assert_truncation_keeps_template_and_label(bbpe, max_length)
    assert bbpe.decode(ids, skip_special_tokens=True).endswith(SUFFIX + " negative")


# ---------------------------------------------------------------------------------------------
# the tiny WordPiece of the tests: there the parts tokenise alike alone and in context
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer()


def test_tiny_wordpiece_encode_is_the_full_string_and_the_old_concatenation(tiny):
    enc = Encoder(tiny, 512)
    assert_full_string_ids(tiny, enc)
    for text in TEXTS:
        assert enc.encode(text, "positive")[0] == old_encode(tiny, text, "positive")
    assert enc.label_ids("positive") == plain(tiny, " positive") == [tiny.convert_tokens_to_ids("positive")]
    check_labels(enc, ALL_WORDS)


def test_tiny_wordpiece_truncation(tiny):
    assert_truncation_keeps_template_and_label(tiny, 60)


def test_prefix_and_suffix_fields(tiny, sp):
    for tok in (tiny, sp):
        enc = Encoder(tok, 512, prefix="Review: ", suffix="\nSentiment:")
        ids, lab = enc.encode("a fine film", "negative")
        assert ids == tok("Review: a fine film\nSentiment: negative")["input_ids"]
        assert lab == Encoder(tok, 512).label_ids("negative")
        assert Encoder(tok, 512, SUFFIX, PREFIX) == Encoder(tok, 512)


# ---------------------------------------------------------------------------------------------
# the label check, before any training
# ---------------------------------------------------------------------------------------------


def test_check_labels_rejects_a_shared_first_token(tiny, sp):
    # "positively" is "positive" + "##l" + "##y" under the tiny WordPiece
    with pytest.raises(ValueError, match="'positive', 'positively'") as err:
        check_labels(Encoder(tiny, 512), ("negative", "positive", "positively"))
    assert "\n" not in str(err.value)
    # without whole-word pieces for them, "negative" and "neutral" both start with "▁n"
    tok = sentencepiece_tokenizer(extra_pieces=["▁n"], words=[w for w in SP_WORDS if w not in ("negative", "neutral")])
    with pytest.raises(ValueError, match="'negative', 'neutral'.*'▁n'"):
        check_labels(Encoder(tok, 512), ALL_WORDS)
    with pytest.raises(ValueError, match="no token"):
        check_labels(Encoder(sp, 512), ("positive", " "))


def test_check_max_length_runs_the_label_check_as_one_user_error(tiny, capsys):
    enc = Encoder(tiny, 96)
    cli.check_max_length(enc, ALL_WORDS)  # the real labels pass
    with pytest.raises(cli.UsageError, match="share their first token"):
        cli.check_max_length(enc, ("positive", "positively"))

    @cli.entry_point
    def main(argv=None):
        cli.check_max_length(enc, ("positive", "positively"))
        raise AssertionError("training started")

    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'positive', 'positively'" in err


def test_template_defaults_come_from_the_task(tiny):
    from utils.task import MCQA, SENTIMENT

    enc = Encoder(tiny, 512)
    assert (enc.prefix, enc.suffix, enc.task) == (PREFIX, SUFFIX, SENTIMENT)
    mcqa = Encoder(tiny, 512, task=MCQA)
    assert (mcqa.prefix, mcqa.suffix) == (MCQA.prefix, MCQA.suffix)
    ids, _ = mcqa.encode("Which? A. x B. y", "B")
    assert ids == tiny(MCQA.render("Which? A. x B. y", "B"))["input_ids"]
    para = Encoder(tiny, 512, task=SENTIMENT, suffix="\nSentiment:")
    assert (para.prefix, para.suffix) == (PREFIX, "\nSentiment:")
