"""Precision like TRL: `train.bf16` / `train.fp16` take true / false / auto; `auto` is TRL's choice on this machine.

The resolved precision (not the switches) enters the run fingerprint and the recorded settings.
"""

from __future__ import annotations

import pytest
from ckptflow.errors import BadInputError, ConfigError
from ckptflow.precision import Hardware, check_supported, resolve, this_machine
from ckptflow.settings import Settings, describe_precision_change, load_settings, settings_from_json

CPU_BF16 = Hardware(cuda=False, bf16=True, name="CPU (AVX512)")  # this machine: avx512_bf16
CPU_OLD = Hardware(cuda=False, bf16=False, name="CPU (AVX2)")
GPU_AMPERE = Hardware(cuda=True, bf16=True, name="CUDA GPU A100")
GPU_TURING = Hardware(cuda=True, bf16=False, name="CUDA GPU T4")

# training_fingerprint() recorded by main before `auto` existed (at 4ef14bf): fp32 runs and bf16=true runs.
_FP32_DEFAULTS = "9e17859d72cb8f6262f47ec1af59604deea08b73437ff3a77341c5e1fdb6e96c"
_BF16_DEFAULTS = "2c3be32be11f611325dee8a6a6ff45ac92864c3514c32ab898b92087fa16b506"


@pytest.mark.parametrize(
    ("bf16", "fp16", "hardware", "expected"),
    [
        ("auto", "auto", CPU_BF16, "bf16"),  # TRL: bf16 = not fp16
        ("auto", "auto", GPU_AMPERE, "bf16"),
        ("auto", "auto", GPU_TURING, "fp16"),  # TRL's default fails there; fp16 is the faster precision it has
        ("auto", "auto", CPU_OLD, "fp32"),  # TRL would emulate bf16, slower than fp32
        ("auto", False, GPU_TURING, "fp32"),
        (False, "auto", CPU_BF16, "fp32"),  # CPUs have no fp16 mixed precision in HF
        (False, "auto", GPU_AMPERE, "fp32"),  # fp16 auto only where bf16 is not native
        (False, "auto", GPU_TURING, "fp16"),
        ("auto", True, CPU_BF16, "fp16"),  # explicit wins over auto (TRL: bf16 = not fp16)
        (True, "auto", GPU_TURING, "bf16"),
        (True, False, CPU_OLD, "bf16"),
        (False, False, GPU_AMPERE, "fp32"),
    ],
)
def test_switches_resolve_like_trl(bf16, fp16, hardware, expected):
    assert resolve(bf16, fp16, hardware) == expected


def test_explicit_switches_need_no_hardware():
    # Recorded settings are resolved true/false: reading them on another machine asks no device.
    bogus = Hardware(cuda=True, bf16=False, name="never asked")
    assert [resolve(True, False, bogus), resolve(False, True, bogus), resolve(False, False, bogus)] == ["bf16", "fp16", "fp32"]


def test_auto_is_what_trl_sftconfig_picks_on_this_machine(tmp_path):
    import torch
    from trl import SFTConfig

    trl = SFTConfig(output_dir=str(tmp_path), use_cpu=not torch.cuda.is_available(), report_to="none")
    trl_choice = "bf16" if trl.bf16 else "fp16" if trl.fp16 else "fp32"
    hardware = this_machine()
    if hardware.bf16:
        assert Settings().train.precision == trl_choice == "bf16"
    else:  # the one place ckptflow departs from TRL on purpose: no native bf16 → the faster precision
        assert Settings().train.precision in ("fp32", "fp16")


def test_the_cpu_flags_answer_agrees_with_torchs_probes():
    # this_machine() answers from /proc/cpuinfo where it can (no torch import for a completed run's
    # fingerprint); it must say what torch's own probes say, or two commands would fingerprint apart.
    import torch
    from ckptflow.precision import _cpu_has_bf16, _linux_x86_cpu_only

    from_flags = _linux_x86_cpu_only()
    if from_flags is None:
        pytest.skip("not a Linux x86 machine without a GPU: torch answers")
    assert (from_flags.cuda, from_flags.bf16) == (torch.cuda.is_available(), _cpu_has_bf16(torch))
    assert this_machine() == from_flags


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("AUTO", "auto"), (" Auto ", "auto"), ("true", True), ("1", True), ("yes", True),
     ("false", False), ("0", False), ("off", False), (True, True), (False, False)],
)  # fmt: skip
def test_switch_spellings(monkeypatch, value, expected):
    monkeypatch.delenv("CKPTFLOW_TRAIN__BF16", raising=False)
    assert load_settings(train={"bf16": value, "fp16": False}).train.bf16 == expected


@pytest.mark.parametrize("value", ["maybe", "2", "", "bf16"])
def test_a_bad_switch_names_the_variable_to_change(monkeypatch, value):
    monkeypatch.setenv("CKPTFLOW_TRAIN__FP16", value or " ")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "CKPTFLOW_TRAIN__FP16" in str(exc.value) and "true, false or 'auto'" in str(exc.value)


def test_both_switches_on_is_refused_naming_both(monkeypatch):
    monkeypatch.setenv("CKPTFLOW_TRAIN__BF16", "true")
    monkeypatch.setenv("CKPTFLOW_TRAIN__FP16", "true")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    message = str(exc.value)
    assert "CKPTFLOW_TRAIN__BF16" in message and "CKPTFLOW_TRAIN__FP16" in message and "from CKPTFLOW_TRAIN__FP16" in message
    assert isinstance(exc.value, BadInputError)


@pytest.mark.parametrize(
    ("train", "recorded"),
    [
        ({"bf16": False}, _FP32_DEFAULTS),  # fp32 runs keep the fingerprint they were recorded with
        ({"bf16": False, "fp16": False}, _FP32_DEFAULTS),
        ({"bf16": True}, _BF16_DEFAULTS),  # so do runs recorded with bf16=true
    ],
)
def test_recorded_fingerprints_do_not_move(train, recorded):
    assert Settings(train=train).training_fingerprint() == recorded


def test_the_resolved_precision_not_the_switch_is_fingerprinted():
    auto = Settings().training_fingerprint()
    expected = _BF16_DEFAULTS if this_machine().bf16 else _FP32_DEFAULTS
    assert auto == expected  # `auto` on a bf16 machine is the same run as bf16=true
    assert Settings(train={"fp16": True, "bf16": False}).training_fingerprint() not in (_FP32_DEFAULTS, _BF16_DEFAULTS)


def test_to_json_records_the_resolved_precision():
    recorded = Settings().to_json()["train"]
    expected = this_machine().bf16
    assert (recorded["bf16"], recorded["fp16"]) == (expected, False)
    assert settings_from_json(Settings().to_json()).training_fingerprint() == Settings().training_fingerprint()


def test_settings_recorded_before_the_switches_existed_mean_fp32():
    recorded = Settings(train={"bf16": False}).to_json()
    del recorded["train"]["bf16"], recorded["train"]["fp16"]
    assert settings_from_json(recorded).train.precision == "fp32"
    assert settings_from_json(recorded).training_fingerprint() == _FP32_DEFAULTS


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ({}, {"bf16": True}, "precision: fp32 -> bf16"),
        ({"bf16": True}, {}, "precision: bf16 -> fp32"),
        ({"fp16": True}, {"bf16": True}, "precision: fp16 -> bf16"),
        ({"bf16": True}, {"bf16": True}, None),
        ({}, {}, None),
    ],
)
def test_a_precision_change_is_one_line_with_the_pin(before, after, expected):
    line = describe_precision_change(before, after)
    if expected is None:
        assert line is None
        return
    assert expected in line
    pin = {"fp32": "CKPTFLOW_TRAIN__BF16=false", "bf16": "CKPTFLOW_TRAIN__BF16=true", "fp16": "CKPTFLOW_TRAIN__FP16=true"}
    assert pin[expected.split()[1]] in line


@pytest.mark.parametrize(
    ("precision", "hardware", "refused"),
    [
        ("fp16", CPU_BF16, "CKPTFLOW_TRAIN__FP16=false"),  # HF would train in fp32 under an fp16 fingerprint
        ("bf16", GPU_TURING, "CKPTFLOW_TRAIN__BF16=auto"),
        ("bf16", CPU_OLD, None),  # emulated, but HF runs it
        ("fp16", GPU_TURING, None),
        ("fp32", CPU_OLD, None),
    ],
)
def test_unsupported_precisions_are_refused_with_what_to_set(precision, hardware, refused):
    if refused is None:
        check_supported(precision, hardware)
        return
    with pytest.raises(ConfigError, match=refused):
        check_supported(precision, hardware)
