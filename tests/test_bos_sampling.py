"""Windows for tokenizers that add a BOS token, and the reference method's token sampling."""

import numpy as np
import pytest
import torch

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Document
from nnobs.data.tokenizer import from_hf
from nnobs.data.windows import document_spans, even_cap, make_windows, opening_windows
from nnobs.models.load import load_model
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.splits import capture_splits, token_windows

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = [
    "def add(x, y):\n    return x + y\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "class Point:\n    def __init__(self, x):\n        self.x = x\n",
    "for i in range(10):\n    total += i * i\n",
]


# --------------------------------------------------------------------------- windows


def _docs(seed: int, n: int = 9) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 60, int(rng.integers(1, 30))) for _ in range(n)]


def test_windows_without_bos_are_unchanged():
    docs = [np.arange(10, 17), np.arange(20, 24)]
    w = make_windows(docs, 3, max_tokens=7, seed=0)
    # The windows this call made before BOS support: consecutive windows share one token.
    assert w.doc_ids.tolist() == [0, 0, 1]
    assert w.input_ids.tolist() == [[10, 11, 12], [13, 14, 15], [20, 21, 22]]
    assert w.targets.tolist() == [[11, 12, 13], [14, 15, 16], [21, 22, 23]]
    assert w.valid.tolist() == [[True] * 3, [True] * 3, [True, False, False]]
    assert w.starts.tolist() == [0, 3, 0]
    np.testing.assert_array_equal(w.attention_mask(), w.valid)


@pytest.mark.parametrize("seed", range(6))
def test_bos_windows_are_the_shorter_windows_shifted_behind_bos(seed):
    docs, bos, length = _docs(seed), 1, 6
    budget = sum(len(d) - 1 for d in docs) - seed
    with_bos = make_windows(docs, length, budget, seed=seed, bos=bos)
    plain = make_windows(docs, length - 1, budget, seed=seed)
    assert (with_bos.input_ids[:, 0] == bos).all()
    assert not with_bos.valid[:, 0].any()  # the BOS row is never scored
    np.testing.assert_array_equal(with_bos.input_ids[:, 1:], plain.input_ids)
    np.testing.assert_array_equal(with_bos.valid[:, 1:], plain.valid)
    np.testing.assert_array_equal(with_bos.targets[:, 1:], plain.targets)
    np.testing.assert_array_equal(with_bos.row_positions(), plain.row_positions())
    assert with_bos.n_tokens == budget
    mask = with_bos.attention_mask()
    assert mask[:, 0].all()  # the BOS is attended to
    np.testing.assert_array_equal(mask[:, 1:], plain.valid)


def reference_rows(docs, budget, bos, opening=512):
    """The reference's sampled (input, target) pairs, written as its code reads: encode each
    document truncated to ``opening`` tokens (BOS included), keep those of 2 or more, sort by
    length, and take every position with a next token in that order until the budget."""
    encoded = [([bos] if bos is not None else []) + list(d) for d in docs]
    encoded = [e[:opening] for e in encoded if len(e[:opening]) >= 2]
    encoded.sort(key=len)
    rows = [(e[t], e[t + 1], doc) for doc, e in enumerate(encoded) for t in range(len(e) - 1)]
    return rows[:budget]


@pytest.mark.parametrize("bos", [None, 2])
@pytest.mark.parametrize("length", [512, 7])
def test_opening_windows_take_the_openings_of_the_shortest_documents(bos, length):
    docs = _docs(3, 12) + [np.arange(3, 40)]
    budget = 60
    w = opening_windows(docs, length, budget, bos=bos, opening=20)
    expected = reference_rows(docs, budget, bos, opening=20)
    got = list(zip(w.input_ids[w.valid].tolist(), w.targets[w.valid].tolist(), strict=True))
    assert got == [(x, y) for x, y, _ in expected]
    lengths = [min(len(docs[d]) + (bos is not None), 20) for d in dict.fromkeys(w.doc_ids)]
    assert lengths == sorted(lengths)  # shortest documents first
    if bos is not None:
        assert (w.input_ids[:, 0] == bos).all()
        assert (w.targets[w.valid] != bos).all()  # BOS is never a scored target
        openings = w.starts == -1
        assert w.valid[openings, 0].all() and not w.valid[~openings, 0].any()
        assert (w.row_positions() >= -1).all()
    if length == 512:  # every opening is one window, as in the reference
        assert len(set(w.doc_ids.tolist())) == len(w.doc_ids)


def test_opening_windows_refuse_a_budget_the_openings_cannot_fill():
    with pytest.raises(NnobsError, match="corpus too small"):
        opening_windows([np.arange(5), np.arange(9)], 8, 13)  # 4 + 8 scored tokens


# --------------------------------------------------------------------------- tokenizers


def _bpe(specials: list[str], bos: str | None = None):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=specials[0]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    if bos is not None:  # a template that puts BOS first, as Llama 3's tokenizer.json does
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def llama_tokenizer():
    return transformers.LlamaTokenizerFast(
        tokenizer_object=_bpe(["<unk>", "<s>", "</s>"]),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
    )


def gemma_tokenizer():
    return transformers.GemmaTokenizerFast(
        tokenizer_object=_bpe(["<pad>", "<eos>", "<bos>", "<unk>"]),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def template_tokenizer():
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_bpe(["<unk>", "<s>", "</s>"], bos="<s>"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def gpt2_style_tokenizer():
    """GPT-2's arrangement: one end-of-text token that is also its declared BOS, never added."""
    eot = "<|endoftext|>"
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_bpe([eot]), bos_token=eot, eos_token=eot, unk_token=eot
    )


@pytest.mark.parametrize(
    "make, bos",
    [(llama_tokenizer, "<s>"), (gemma_tokenizer, "<bos>"), (template_tokenizer, "<s>")],
)
def test_tokenizers_that_add_bos_name_it(make, bos):
    hf = make()
    assert hf("def f")["input_ids"][0] == hf.convert_tokens_to_ids(bos)  # the family adds it
    tok = from_hf(hf)
    assert tok.bos_id == hf.convert_tokens_to_ids(bos)
    assert tok.bos_id not in tok.encode("def f(x):")  # encodings stay without special tokens


def test_tokenizers_that_add_no_bos_have_none():
    assert from_hf(gpt2_style_tokenizer()).bos_id is None
    off = transformers.LlamaTokenizerFast(
        tokenizer_object=_bpe(["<unk>", "<s>", "</s>"]),
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=False,
    )
    assert from_hf(off).bos_id is None


# --------------------------------------------------------------------------- observe's capture


def _save_model(directory, family: str, hf_tokenizer) -> None:
    common = dict(
        vocab_size=len(hf_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
    )
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    else:
        config = transformers.GemmaConfig(**common, head_dim=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights, so a missing BOS would change every loss
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    hf_tokenizer.save_pretrained(directory)


def _split_docs() -> dict[str, list[Document]]:
    return {
        split: [Document(f"{split}/{i}", TEXTS[i % 4] * (2 + i % 3)) for i in range(8)]
        for split in ("train", "validation")
    }


@pytest.mark.parametrize("family, make", [("llama", llama_tokenizer), ("gemma", gemma_tokenizer)])
@pytest.mark.parametrize("sampling", ["spread", "reference"])
def test_observe_capture_starts_windows_with_bos_and_never_scores_it(
    tmp_path, family, make, sampling
):
    _save_model(tmp_path, family, make())
    adapter = load_model(str(tmp_path))
    bos = adapter.tokenizer.bos_id
    assert bos is not None
    settings = ObserveSettings(ex_per_dim=4, seq_len=24, sampling=sampling)  # 128 tokens
    docs = _split_docs()
    windows = token_windows(adapter, docs, settings)["train"]
    assert (windows.input_ids[:, 0] == bos).all()
    assert (windows.targets[windows.valid] != bos).all()
    if sampling == "spread":
        assert not windows.valid[:, 0].any()
    site = adapter.site_name(1, "resid_post")
    train = {"train": docs["train"]}
    cap = capture_splits(adapter, train, [site], settings, None, False, windows={"train": windows})
    cap = cap["train"].cap
    assert len(cap.loss) == windows.n_tokens == 128

    # Every captured loss is the model's own on the window with its BOS attended to.
    with torch.no_grad():
        ids = torch.from_numpy(windows.input_ids)
        logp = adapter.model(ids, attention_mask=torch.from_numpy(windows.attention_mask()))
        logp = logp.logits.float().log_softmax(-1)
        manual = -logp.gather(2, torch.from_numpy(windows.targets)[..., None])[..., 0]
        np.testing.assert_allclose(cap.loss, manual.numpy()[windows.valid], rtol=1e-4, atol=1e-4)
        # Without the BOS the same tokens score differently: the check can fail.
        no_bos = adapter.model(ids[:1, 1:]).logits.float().log_softmax(-1)
        cols = np.flatnonzero(windows.valid[0, 1:])
        lost = -no_bos[0, cols].gather(1, torch.from_numpy(windows.targets[0, 1:][cols])[:, None])
        assert not np.allclose(lost[:, 0].numpy(), manual[0, 1:][cols].numpy(), atol=1e-3)


def test_gpt2_style_tokenizer_windows_are_bit_identical(tmp_path):
    hf = gpt2_style_tokenizer()
    config = transformers.GPT2Config(
        vocab_size=len(hf), n_positions=64, n_embd=32, n_layer=2, n_head=4
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    adapter = load_model(str(tmp_path))
    assert adapter.tokenizer.bos_id is None
    settings = ObserveSettings(ex_per_dim=4, seq_len=24)
    docs = _split_docs()
    windows = token_windows(adapter, docs, settings)["train"]
    ids = [np.asarray(adapter.tokenizer.encode(d.text), dtype=np.int32) for d in docs["train"]]
    expected = make_windows(document_spans(ids, even_cap(ids, 128), 0), 24, 128, seed=0)
    for field in ("input_ids", "targets", "valid", "doc_ids", "starts"):
        np.testing.assert_array_equal(getattr(windows, field), getattr(expected, field))


def test_observe_refuses_a_budget_the_openings_cannot_fill(tmp_path, expect_refusal):
    _save_model(tmp_path / "model", "llama", llama_tokenizer())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXTS * 3):
        (corpus / f"doc{i}.py").write_text(text * 4)
    argv = ["observe", "--model", tmp_path / "model", "--corpus", corpus, "--domain2", "none"]
    argv += ["--sampling", "reference", "--ex-per-dim", "200", "--out", tmp_path / "out"]
    expect_refusal(argv, "corpus too small", watch=[tmp_path])
