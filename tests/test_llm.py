"""Decoder-only backbones: prompt templates, tokenizers without a pad token, causal masks with
padding and sliding windows, last-token pooling, and every command on a causal cache.

Exactness per family (cache = direct forward, late route = full model, cached training =
online training, predictions = cached evaluation) is covered by the suites parametrized over
``FAMILIES``; this file covers what only decoder-only models have.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import CAUSAL_FAMILIES
from transformers import AutoTokenizer

from sherl_cache import load_run, open_cache
from sherl_cache.config.extract import ExtractConfig
from sherl_cache.config.train import TrainConfig
from sherl_cache.data.files import load_glue
from sherl_cache.data.tasks import get_task
from sherl_cache.errors import ConfigError
from sherl_cache.experiments.sweep import SweepConfig, run_sweep
from sherl_cache.extraction.extract import extract
from sherl_cache.families import get_family
from sherl_cache.families.decoder import causal_mask
from sherl_cache.inference.evaluate import evaluate_run
from sherl_cache.store.verify import verify_cache
from sherl_cache.training.features import Batch
from sherl_cache.training.recipe import train

TEMPLATE = "Sentence 1: {text_a}\\nSentence 2: {text_b}\\nSame meaning?"


def extract_config(tmp_path, model, glue_dir, **overrides) -> ExtractConfig:
    values = dict(
        model=str(model),
        task="mrpc",
        data_dir=glue_dir,
        cache_root=tmp_path / "caches",
        device="cpu",
        dtype="float32",
    )
    return ExtractConfig(**(values | overrides))


@pytest.fixture(scope="module")
def llama_cache(tmp_path_factory, tiny_models, glue_dir):
    root = tmp_path_factory.mktemp("llm")
    config = extract_config(root, tiny_models["llama"], glue_dir, template=TEMPLATE)
    return extract(config, progress=False).path


def test_fixture_tokenizers_have_no_pad_token(tiny_models):
    for family in CAUSAL_FAMILIES:
        tokenizer = AutoTokenizer.from_pretrained(tiny_models[family])
        assert tokenizer.pad_token is None or family == "qwen2", family
        assert tokenizer.bos_token_id is not None and tokenizer.eos_token_id is not None


def test_template_decides_the_tokens_and_is_recorded(llama_cache, tiny_models, glue_dir):
    cache = open_cache(llama_cache)
    assert cache.manifest["tokenizer"]["template"] == TEMPLATE.replace("\\n", "\n")
    assert "--template" in cache.manifest["command"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    rows = load_glue(get_task("mrpc"), glue_dir).splits["train"]
    prompt = TEMPLATE.replace("\\n", "\n").format(text_a=rows.texts[0][0], text_b=rows.texts[1][0])
    body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    np.testing.assert_array_equal(cache.input_ids("train", 0), expected)


def test_truncation_keeps_bos_and_eos(tmp_path, tiny_models, glue_dir):
    result = extract(
        extract_config(tmp_path, tiny_models["qwen3"], glue_dir, max_length=12), progress=False
    )
    cache = open_cache(result.path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen3"])
    assert cache.manifest["splits"]["train"]["truncated"] > 0
    for i in range(cache.num_examples("train")):
        ids = cache.input_ids("train", i)
        assert len(ids) <= 12
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{text_a}", r"must contain \{text_a\} and \{text_b\}"),
        ("{text_a} {text_b} {label}", r"no other \{field\}"),
        ("{text_a", r"not a valid template"),
    ],
)
def test_bad_templates_are_refused_before_any_forward_pass(
    tmp_path, tiny_models, glue_dir, template, match
):
    with pytest.raises(ConfigError, match=r"--template .*" + match):
        extract(extract_config(tmp_path, tiny_models["gpt2"], glue_dir, template=template))


def test_template_on_an_encoder_is_refused(tmp_path, tiny_models, glue_dir):
    with pytest.raises(ConfigError, match=r"--template applies to decoder-only models"):
        extract(extract_config(tmp_path, tiny_models["bert"], glue_dir, template="{text_a}"))


def test_causal_mask_combines_causality_padding_and_window():
    mask = causal_mask(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), torch.float32, window=2)
    visible = (mask == 0).int()
    assert visible[0, 0].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert visible[1, 0, :, 2:].sum() == 0  # padding is never a key
    assert visible[1, 0, 1].tolist() == [1, 1, 0, 0]


def test_last_pooling_reads_the_last_real_token():
    from sherl_cache.training.model import SherlModel

    states = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    model = SherlModel.__new__(SherlModel)
    torch.nn.Module.__init__(model)
    model.fusion = lambda taps, last, m: last
    model.late = lambda hidden, m: hidden
    model.pool, model.regression, model.late_bf16, model.tap_dropout = "last", False, False, 0.0
    model.head = torch.nn.Identity()
    pooled = model(Batch(taps=[states], last=states, mask=mask, labels=None))
    torch.testing.assert_close(pooled, torch.stack([states[0, 3], states[1, 1]]))


def test_causal_defaults_and_first_pooling_refused(tmp_path, llama_cache):
    family = get_family("llama")
    assert (family.default_pool, family.default_dtype, family.causal) == ("last", "bfloat16", True)
    metrics = train(
        TrainConfig(cache=llama_cache, out=tmp_path / "run", epochs=1, batch_size=8),
        progress=False,
    ).metrics
    assert metrics["steps"] == 3
    assert load_run(tmp_path / "run", device="cpu").config.pool == "last"  # recorded resolved
    with pytest.raises(ConfigError, match=r"--pool first .* decoder-only"):
        train(
            TrainConfig(cache=llama_cache, out=tmp_path / "first", pool="first", epochs=1),
            progress=False,
        )


@pytest.mark.slow
def test_predictions_with_a_custom_template_equal_cached_evaluation(
    tmp_path, llama_cache, glue_dir
):
    from sherl_cache.training.features import CachedFeatures
    from sherl_cache.training.loop import evaluate

    out = train(
        TrainConfig(
            cache=llama_cache,
            out=tmp_path / "lora",
            late_layers=2,
            late_mode="lora",
            epochs=1,
            batch_size=8,
            lr=1e-2,
        ),
        progress=False,
    ).out
    run = load_run(out, device="cpu")
    cache = open_cache(run.record.cache)
    source = CachedFeatures(cache, "validation", run.taps, run.split_index)
    cached, _ = evaluate(run.model, source, run.task, torch.device("cpu"), 8)
    split = load_glue(run.task, glue_dir, ["validation"]).splits["validation"]
    online = run.predict_split(split, batch_size=3).outputs
    np.testing.assert_allclose(online, cached, atol=1e-5, rtol=1e-4)
    from_cache = evaluate_run(run, "validation", data_dir=glue_dir, progress=False)
    assert from_cache.source.startswith("cache ")
    gone = dataclasses.replace(run.record.config, cache=str(tmp_path / "gone"))
    run.record = dataclasses.replace(run.record, config=gone)
    on_the_fly = evaluate_run(
        run, "validation", data_dir=glue_dir, output=tmp_path / "e.json", progress=False
    )
    assert on_the_fly.source == "computed on the fly"
    assert on_the_fly.metrics == pytest.approx(from_cache.metrics)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_verify_recomputes_causal_caches(tmp_path, tiny_models, glue_dir, family):
    result = extract(
        extract_config(tmp_path, tiny_models[family], glue_dir, dtype="bfloat16"), progress=False
    )
    report = verify_cache(result.path, recompute=4)
    assert report.ok and report.recomputed == 4, report.lines()


def test_sweep_over_a_causal_cache(tmp_path, llama_cache):
    result = run_sweep(
        SweepConfig(
            cache=llama_cache,
            out=tmp_path / "sweep",
            grid={"late_mode": ("frozen", "lora")},
            fixed={"epochs": 1, "batch_size": 8},
        )
    )
    assert [row["status"] for row in result.rows] == ["ok", "ok"]
