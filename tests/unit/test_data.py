"""Data loading, errors that name file and row, splitting, fingerprints, the tokenized cache, and SFTTrainer."""

import csv
import json
import math
import os

import datasets
import pytest

from ckptflow import data as data_mod
from ckptflow.builtin import DEMO_EVAL, DEMO_TRAIN, TINY_GPT2, materialize_tiny_gpt2
from ckptflow.data import PreparedData, load_texts, prepare_data, tokenizer_identity
from ckptflow.errors import DataError
from ckptflow.modeling import load_base_model, load_tokenizer, lora_config, resolve_model
from ckptflow.settings import DataSettings, ModelSettings

TEXTS = ["first text", "second text", "third text"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    materialize_tiny_gpt2(home)
    return resolve_model(TINY_GPT2, home)


@pytest.fixture
def tok(tiny):
    return load_tokenizer(tiny)


def write_jsonl(path, rows, field="text"):
    path.write_text("".join(json.dumps({field: r} if isinstance(r, str) else r) + "\n" for r in rows))
    return path


def prep(tok, tmp_path, max_length=64, seed=42, **data):
    return prepare_data(DataSettings(**data), tokenizer=tok, max_length=max_length, seed=seed, cache_dir=tmp_path / "cache")


# -- load_texts -------------------------------------------------------------------------------


def test_builtin_datasets_have_their_own_eval():
    assert load_texts("builtin:demo", "text") == (list(DEMO_TRAIN), list(DEMO_EVAL))
    train, eval_ = load_texts("builtin:demo-large", "text")
    assert (len(train), len(eval_)) == (512, 32)


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "x": 1}\n\n   \n{"text": "b"}\n')
    assert load_texts(str(path), "text") == (["a", "b"], None)


def test_csv_and_parquet(tmp_path):
    with (tmp_path / "d.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "body"])
        w.writerows([[1, "one, with comma"], [2, "two\nlines"]])
    assert load_texts(str(tmp_path / "d.csv"), "body") == (["one, with comma", "two\nlines"], None)
    datasets.Dataset.from_dict({"text": TEXTS, "n": [1, 2, 3]}).to_parquet(str(tmp_path / "d.parquet"))
    assert load_texts(str(tmp_path / "d.parquet"), "text") == (TEXTS, None)


@pytest.mark.parametrize("eval_split", ["validation", "eval", "test", None])
def test_saved_dataset_dirs(tmp_path, eval_split):
    splits = {"train": datasets.Dataset.from_dict({"text": TEXTS})}
    if eval_split:
        splits[eval_split] = datasets.Dataset.from_dict({"text": ["held"]})
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    assert load_texts(str(tmp_path / "dd"), "text") == (TEXTS, ["held"] if eval_split else None)
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts(str(tmp_path / "ds"), "text") == (TEXTS, None)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("train.jsonl", None, "data file train.jsonl does not exist: set CKPTFLOW_DATA__TRAIN to an existing file"),
        ("train.txt", "hello\n", "data file train.txt has unsupported extension '.txt'"),
        ("train.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text" "c"}\n', "train.jsonl line 3: invalid JSON (Expecting ':'"),
        (
            "train.jsonl",
            '{"text": "a"}\n{"prompt": "p", "answer": "b"}\n',
            "train.jsonl line 2 has no field 'text' (fields: prompt, answer): set CKPTFLOW_DATA__TEXT_FIELD",
        ),
        ("train.jsonl", '{"text": 5}\n', "train.jsonl line 1: field 'text' is int, expected a non-empty string"),
        ("train.jsonl", '{"text": "a"}\n\n{"text": "  "}\n', "train.jsonl line 3: field 'text' is empty"),
        ("train.jsonl", '{"text": null}\n', "train.jsonl line 1: field 'text' is missing or null"),
        ("train.jsonl", "[1, 2]\n", "train.jsonl line 1: expected a JSON object, got list"),
        ("train.jsonl", "\n\n", "train.jsonl contains no rows"),
        ("train.csv", "id,body\n1,x\n", "train.csv line 1 has no field 'text' (fields: id, body)"),
        ("train.csv", "text,n\nok,1\n,2\n", "train.csv line 3: field 'text' is empty"),
        ("train.parquet", "not parquet", "train.parquet: cannot read parquet"),
        ("builtin:nope", None, "unknown built-in dataset 'builtin:nope' (known: builtin:demo, builtin:demo-large)"),
    ],
)
def test_load_errors_name_file_and_row(tmp_path, monkeypatch, name, content, expected):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as info:
        load_texts(name, "text")
    assert expected in str(info.value)


def test_parquet_and_dataset_dir_errors_name_the_row(tmp_path):
    datasets.Dataset.from_dict({"text": ["ok", ""]}).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet row 1 \(0-based\): field 'text' is empty"):
        load_texts(str(tmp_path / "d.parquet"), "text")
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"has no 'train' split \(splits: validation\)"):
        load_texts(str(tmp_path / "dd"), "text")


def test_eval_errors_name_the_eval_setting(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", TEXTS)
    with pytest.raises(DataError, match="set CKPTFLOW_DATA__EVAL to an existing file"):
        prep(tok, tmp_path, train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "eval.jsonl"))


# -- splitting --------------------------------------------------------------------------------


def test_demo_defaults_reproduce_the_classic_demo(tok, tmp_path):
    prepared = prep(tok, tmp_path)
    assert isinstance(prepared, PreparedData)
    assert (prepared.train_rows, prepared.eval_rows) == (4, 2)
    assert "eval split" in prepared.source


@pytest.mark.parametrize(
    ("n_rows", "fraction", "expected"),
    [(4, 0.1, (3, 1)), (20, 0.25, (15, 5)), (2, 0.1, (1, 1)), (1, 0.5, (1, 0)), (10, 0.0, (10, 0))],
)
def test_held_out_eval(tok, tmp_path, n_rows, fraction, expected):
    path = write_jsonl(tmp_path / "t.jsonl", [f"row {i}" for i in range(n_rows)])
    prepared = prep(tok, tmp_path, train=str(path), eval_fraction=fraction)
    assert (prepared.train_rows, prepared.eval_rows) == expected
    assert (prepared.eval is None) == (expected[1] == 0)


def test_hold_out_is_seeded_and_keeps_file_order():
    train = [f"row {i}" for i in range(20)]
    kept, held = data_mod._hold_out(train, 0.25, seed=1)
    assert data_mod._hold_out(train, 0.25, seed=1) == (kept, held)
    assert data_mod._hold_out(train, 0.25, seed=2) != (kept, held)
    assert sorted(kept + held, key=train.index) == train
    assert kept == sorted(kept, key=train.index) and held == sorted(held, key=train.index)


def test_explicit_eval_file(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", TEXTS)
    ev = write_jsonl(tmp_path / "eval.jsonl", ["an eval text"])
    prepared = prep(tok, tmp_path, train=str(train), eval=str(ev))
    assert (prepared.train_rows, prepared.eval_rows) == (3, 1)


# -- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_is_content_based(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    (tmp_path / "sub").mkdir()
    b = write_jsonl(tmp_path / "sub" / "b.jsonl", [{"text": t, "extra": 1} for t in TEXTS])
    fp = prep(tok, tmp_path, train=str(a)).fingerprint
    assert prep(tok, tmp_path, train=str(b)).fingerprint == fp
    os.utime(a, (0, 0))
    assert prep(tok, tmp_path, train=str(a)).fingerprint == fp
    assert prep(tok, tmp_path, train=str(a), max_length=32).fingerprint != fp
    assert prep(tok, tmp_path, train=str(a), eval_fraction=0.5).fingerprint != fp
    c = write_jsonl(tmp_path / "c.jsonl", [*TEXTS[:2], "third text!"])
    assert prep(tok, tmp_path, train=str(c)).fingerprint != fp


def test_tokenizer_identity_ignores_runtime_state_but_not_vocab(tok, tmp_path):
    ident = tokenizer_identity(tok)
    tok(["some text"] * 2, truncation=True, max_length=3, padding="max_length")
    assert tokenizer_identity(tok) == ident
    bigger = materialize_tiny_gpt2(tmp_path, n_layer=1)  # same tokenizer recipe → same identity
    from transformers import AutoTokenizer

    assert tokenizer_identity(AutoTokenizer.from_pretrained(bigger)) == ident
    tok2 = AutoTokenizer.from_pretrained(bigger)
    tok2.add_tokens(["<new>"])
    assert tokenizer_identity(tok2) != ident


# -- tokenization and cache -----------------------------------------------------------------


def test_tokenization_is_text_plus_eos_truncated_from_the_end(tok, tmp_path):
    prepared = prep(tok, tmp_path)
    assert prepared.train.column_names == ["input_ids"]
    for text, row in zip(DEMO_TRAIN, prepared.train):
        assert row["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]
    short = prep(tok, tmp_path, max_length=3)
    assert short.train[0]["input_ids"] == tok(DEMO_TRAIN[0])["input_ids"][:3]


def test_second_call_reads_the_cache(tok, tmp_path, monkeypatch):
    first = prep(tok, tmp_path)
    entry = tmp_path / "cache" / first.fingerprint
    assert all(f["filename"].startswith(str(entry)) for f in first.train.cache_files + first.eval.cache_files)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache entry exists")

    monkeypatch.setattr(data_mod, "tokenize_texts", no_tokenizing)
    second = prep(tok, tmp_path)
    assert second.fingerprint == first.fingerprint
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.eval["input_ids"] == first.eval["input_ids"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.fingerprint]  # no temp dirs left


def test_damaged_cache_entry_is_rebuilt(tok, tmp_path):
    first = prep(tok, tmp_path)
    expected = list(first.train["input_ids"])
    entry = tmp_path / "cache" / first.fingerprint
    for arrow in entry.rglob("*.arrow"):
        arrow.write_bytes(b"garbage")
    again = prep(tok, tmp_path)
    assert list(again.train["input_ids"]) == expected


def test_concurrent_writer_that_finished_first_wins(tmp_path):
    entry = tmp_path / "cache" / "fp"
    data_mod._write_cache(entry, [[1, 2]], None, {"who": "first"})
    data_mod._write_cache(entry, [[3, 4]], [[5]], {"who": "second"})
    train, eval_, meta = data_mod._read_cache(entry)
    assert (train["input_ids"], eval_, meta["who"]) == ([[1, 2]], None, "first")
    assert [p.name for p in entry.parent.iterdir()] == ["fp"]


# -- the real consumer --------------------------------------------------------------------------


def test_sft_trainer_tokenizes_the_same_and_trains_on_prepared_data(tiny, tok, tmp_path):
    from trl import SFTConfig, SFTTrainer

    prepared = prep(tok, tmp_path, max_length=128)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_length=128,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
    )
    # 1 TRL tokenizing plain text itself gives exactly our ids (EOS appended, same truncation)
    raw = SFTTrainer(
        model=load_base_model(tiny),
        processing_class=tok,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": list(DEMO_TRAIN)}),
        eval_dataset=datasets.Dataset.from_dict({"text": list(DEMO_EVAL)}),
        peft_config=lora_config(ModelSettings()),
    )
    assert raw.train_dataset["input_ids"] == prepared.train["input_ids"]
    assert raw.eval_dataset["input_ids"] == prepared.eval["input_ids"]
    # 2 training on our pre-tokenized data works and evaluates to a finite loss
    trainer = SFTTrainer(
        model=load_base_model(tiny),
        processing_class=tok,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        peft_config=lora_config(ModelSettings()),
    )
    assert trainer.train().global_step == 2
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
