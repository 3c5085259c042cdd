"""Quantized bases: detection from metadata, exact row-block dequantization, and what the merge must match.

References are the libraries themselves: bitsandbytes' dequantize_4bit / int8_vectorwise_dequant,
transformers' model.dequantize() and its FP8 loader, and PeftModel on the bnb-loaded model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from merge_core.checkpoint import load_base_checkpoint
from merge_core.errors import QuantizationStateError, UnsupportedQuantizationError
from merge_core.quant import (
    QuantKind,
    bnb_settings,
    checkpoint_reader,
    config_shapes,
    dequantize_rows,
    dequantize_tensor,
    detect_quantization,
    plain_config,
    requantize,
    resolve_shapes,
    with_shape_hints,
)
from merge_core.safetensors_io import OpenFiles, read_tensor
from tests.factories import make_adapter
from tests.quant_factories import (
    bnb4_state,
    dict_reader,
    fp8_quantize,
    header_of,
    make_bnb_base,
    make_float_base,
    make_fp8_base,
)

BNB4 = {"nf4": ("nf4", False), "nf4-dq": ("nf4", True), "fp4": ("fp4", False), "fp4-dq": ("fp4", True)}
FP8 = {"fp8-tensor": None, "fp8-block": (16, 16)}
LINEARS = 2 * 7  # two decoder layers, seven projections each
ROW_BLOCK_CHECKS = {"model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    out = {"float": make_float_base(root / "float")}
    for key, (kind, double) in BNB4.items():
        out[key] = make_bnb_base(out["float"], root / key, kind, double_quant=double)
    out["int8"] = make_bnb_base(out["float"], root / "int8", "int8")
    for key, block in FP8.items():
        out[key] = make_fp8_base(out["float"], root / key, block=block)
    return out


@pytest.fixture
def opened():
    """open(folder) -> (checkpoint, resolved QuantizedBase, RowReader); files closed afterwards."""
    files = OpenFiles()

    def open_(folder: Path):
        base = load_base_checkpoint(folder)
        qbase = detect_quantization(base.config, base.tensors)
        read = checkpoint_reader(base.tensors, files)
        return base, (resolve_shapes(qbase, read) if qbase else None), read

    yield open_
    files.close()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, *, zero_sign: bool = True) -> None:
    """Equal bit for bit; with zero_sign=False, -0.0 and +0.0 count as the same bits."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if not zero_sign:
        got, want = got + 0.0, want + 0.0  # IEEE: -0.0 + 0.0 == +0.0, every other value unchanged
    assert torch.equal(_bits(got), _bits(want)), f"{(got != want).sum().item()} values differ"


def assert_row_blocks_equal(tensor, read, want: torch.Tensor, sizes=(5, 16, 50), **kwargs) -> None:
    """Row blocks of several sizes, concatenated, and a few single rows, are the whole tensor bit for bit.

    Few calls on purpose: bitsandbytes' OpenMP kernels cost milliseconds per call on a busy 2-core box.
    """
    rows = want.shape[0]
    for size in sizes:
        parts = [dequantize_rows(tensor, read, a, min(a + size, rows)) for a in range(0, rows, size)]
        assert_bitwise(torch.cat(parts), want, **kwargs)
    for row in {0, rows // 2 + 1, rows - 1}:
        assert_bitwise(dequantize_rows(tensor, read, row, row + 1), want[row : row + 1], **kwargs)


# --- detection ------------------------------------------------------------------------------------


class TestDetection:
    @pytest.mark.parametrize("key", list(BNB4))
    def test_bnb_4bit(self, bases, opened, key):
        base = load_base_checkpoint(bases[key])
        plain = load_base_checkpoint(bases["float"])
        qbase = detect_quantization(base.config, base.tensors)
        kind, double = BNB4[key]
        assert qbase is not None and qbase.method == "bitsandbytes" and qbase.kinds() == [QuantKind.BNB_4BIT]
        assert len(qbase.tensors) == LINEARS and not qbase.resolved  # shapes live in the quant-state JSON
        q_proj = qbase.tensors["model.layers.0.self_attn.q_proj.weight"]
        assert q_proj.fits_shape((64, 64)) and q_proj.fits_shape((32, 128)) and not q_proj.fits_shape((64, 128))
        # The side tensors are exactly what the float model does not have, so the output is the float layout.
        assert qbase.auxiliary == set(base.tensors) - set(plain.tensors)
        assert set(base.tensors) - qbase.auxiliary == set(plain.tensors)
        _, qbase, _ = opened(bases[key])
        assert not qbase.tensors[q_proj.name].fits_shape((32, 128))
        for t in qbase.tensors.values():
            assert t.shape == plain.tensors[t.name].info.shape and t.quant_type == kind
            assert t.bnb4.nested is double and t.bnb4.blocksize == 64 and t.bnb4.dtype == torch.float32
        logical = qbase.logical_tensors(torch.bfloat16)
        assert {lt.name: lt.shape for lt in logical} == {n: plain.tensors[n].info.shape for n in qbase.tensors}
        assert {lt.dtype for lt in logical} == {torch.bfloat16}
        assert qbase.default_dtype == torch.float32 and "unquantized weights" in qbase.dtype_source
        words = qbase.describe()
        assert kind.upper() in words and ("with double" if double else "without double") in words
        facts = qbase.facts()
        assert facts["quant_types"] == [kind] and facts["double_quant"] == [double] and facts["blocksizes"] == [64]
        assert json.loads(json.dumps(facts)) == facts

    def test_shapes_from_the_config_before_any_data_is_read(self, bases):
        base = load_base_checkpoint(bases["nf4-dq"])
        plain = load_base_checkpoint(bases["float"])
        qbase = detect_quantization(base.config, base.tensors)
        hinted = with_shape_hints(qbase, config_shapes(base.config))
        want = {n: plain.tensors[n].info.shape for n in qbase.tensors}
        assert {lt.name: lt.shape for lt in hinted.logical_tensors()} == want
        assert not hinted.resolved  # the blocksize and nesting still come from the quant states
        name = "model.layers.0.mlp.up_proj.weight"
        wrong = with_shape_hints(qbase, {name: (64, 64)})  # holds 128x64 values: a hint that does not fit is ignored
        assert wrong.tensors[name].shape is None
        assert config_shapes({"model_type": "no-such-model"}) == {}

    def test_default_output_dtype_is_the_dtype_of_the_unquantized_weights(self, bases):
        base = load_base_checkpoint(bases["nf4"])
        config = copy.deepcopy(base.config)
        config["quantization_config"]["bnb_4bit_compute_dtype"] = "bfloat16"
        # The matmuls' dtype does not change what the weights are stored and dequantized in (float32 here).
        assert detect_quantization(config, base.tensors).default_dtype == torch.float32
        header = {n: (t.info.dtype, t.info.shape) for n, t in base.tensors.items()}
        only_quantized = {n: e for n, e in header.items() if n in base.quant.tensors or n in base.quant.auxiliary}
        assert detect_quantization(config, only_quantized).default_dtype == torch.bfloat16  # the compute dtype
        del config["quantization_config"]["bnb_4bit_compute_dtype"]
        config.pop("dtype", None)
        assert detect_quantization(config, only_quantized).default_dtype == torch.bfloat16

    def test_bnb_8bit(self, bases, opened):
        base, qbase, _ = opened(bases["int8"])
        plain = load_base_checkpoint(bases["float"])
        assert qbase.kinds() == [QuantKind.BNB_8BIT] and len(qbase.tensors) == LINEARS and qbase.resolved
        for t in qbase.tensors.values():
            assert t.shape == plain.tensors[t.name].info.shape
            assert set(t.parts) == {"data", "scb", "weight_format"} and t.parts["scb"].endswith("proj.SCB")
        assert set(base.tensors) - qbase.auxiliary == set(plain.tensors)
        assert "8-bit" in qbase.describe()

    @pytest.mark.parametrize("key", list(FP8))
    def test_fp8(self, bases, opened, key):
        base, qbase, _ = opened(bases[key])
        assert qbase.method == "fp8" and qbase.kinds() == [QuantKind.FP8] and len(qbase.tensors) == LINEARS
        assert {t.block for t in qbase.tensors.values()} == {FP8[key]}
        assert qbase.auxiliary == {n for n in base.tensors if n.endswith("weight_scale_inv")}
        assert ("16x16 block scales" if FP8[key] else "one scale per tensor") in qbase.describe()
        assert qbase.facts()["fp8_blocks"] == [list(FP8[key]) if FP8[key] else None]

    @pytest.mark.parametrize("suffix", ["weight_scale_inv", "qscale_weight", "scale"])
    def test_fp8_scale_names_transformers_renames(self, suffix):
        q, s = fp8_quantize(torch.randn(32, 32), (16, 16))
        header = header_of({"l.weight": q, f"l.{suffix}": s, "norm.scale": torch.ones(32)})
        config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
        qbase = detect_quantization(config, header)
        assert list(qbase.tensors) == ["l.weight"] and qbase.auxiliary == {f"l.{suffix}"}

    def test_float_base_with_quantization_config(self, bases):
        base = load_base_checkpoint(bases["float"])
        config = dict(base.config, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
        qbase = detect_quantization(config, base.tensors)
        assert qbase is not None and qbase.config_only and qbase.auxiliary == set() and qbase.logical_tensors() == []
        assert "plain floating point" in qbase.describe()
        assert "quantization_config" not in plain_config(config) and "quantization_config" in config

    def test_plain_float_base_is_not_quantized(self, bases):
        base = load_base_checkpoint(bases["float"])
        assert detect_quantization(base.config, base.tensors) is None
        # Integer buffers and float tensors that happen to share a packed format's name are no quantization.
        header = dict(base.tensors, **{"embeddings.position_ids": ("I64", (1, 64)), "vq.codes": ("F32", (8, 4))})
        assert detect_quantization(base.config, header) is None

    @pytest.mark.parametrize(
        ("method", "names", "fmt"),
        [
            ("gptq", {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"}, "GPTQ"),
            ("awq", {"qweight": "I32", "qzeros": "I32", "scales": "F16"}, "AWQ"),
            (None, {"qweight": "I32", "qzeros": "I32", "scales": "F16"}, "GPTQ or AWQ"),
            ("hqq", {"W_q": "U8", "scale": "F16"}, "HQQ"),
            ("compressed-tensors", {"weight": "F8_E4M3", "weight_scale": "F32"}, "compressed-tensors"),
            (None, {"weight": "F8_E4M3"}, "FP8 scheme without weight_scale_inv"),
            ("eetq", {"weight": "I8", "weight_scales": "F16"}, "EETQ"),
            (None, {"weight": "I32"}, "unrecognised scheme (model.layers.0.self_attn.q_proj.weight is stored as I32)"),
        ],
    )
    def test_packed_formats_are_refused(self, method, names, fmt):
        module = "model.layers.0.self_attn.q_proj"
        header = {f"{module}.{n}": (dtype, (64, 64)) for n, dtype in names.items()}
        header["model.embed_tokens.weight"] = ("BF16", (96, 64))
        config = {"model_type": "llama", **({"quantization_config": {"quant_method": method}} if method else {})}
        with pytest.raises(UnsupportedQuantizationError) as err:
            detect_quantization(config, header)
        message = str(err.value)
        assert fmt in message and "full-precision model it was made from" in message
        assert message.count(". ") == 0 and "adapter belongs" not in message

    def test_incomplete_4bit_weight(self, bases):
        base = load_base_checkpoint(bases["nf4-dq"])
        header = {n: t for n, t in base.tensors.items() if not n.endswith("q_proj.weight.nested_absmax")}
        with pytest.raises(QuantizationStateError, match="q_proj.weight lacks"):
            detect_quantization(base.config, header)

    def test_int8_weight_without_its_scale(self, bases):
        base = load_base_checkpoint(bases["int8"])
        header = {n: t for n, t in base.tensors.items() if n != "model.layers.1.mlp.up_proj.SCB"}
        with pytest.raises(QuantizationStateError, match="up_proj.weight .I8. has no scale"):
            detect_quantization(base.config, header)

    def test_quant_state_that_contradicts_the_weight(self):
        state = bnb4_state(torch.randn(64, 64), "w", blocksize=64, quant_type="nf4")
        info = json.loads(bytes(state["w.quant_state.bitsandbytes__nf4"].tolist()))
        info["shape"] = [64, 128]
        state["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
        qbase = detect_quantization({}, header_of(state))
        with pytest.raises(QuantizationStateError, match="does not match its quant state"):
            resolve_shapes(qbase, dict_reader(state))

    def test_fp8_scales_that_do_not_tile_the_weight(self):
        q, s = fp8_quantize(torch.randn(64, 64), (16, 16))
        header = header_of({"l.weight": q, "l.weight_scale_inv": s})
        with pytest.raises(QuantizationStateError, match="does not tile"):
            detect_quantization({"quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 16]}}, header)

    def test_plain_config(self):
        config = {"model_type": "x", "torch_dtype": "float16", "text_config": {"quantization_config": {"a": 1}},
                  "quantization_config": {"quant_method": "bitsandbytes"}}  # fmt: skip
        out = plain_config(config, torch.bfloat16)
        assert out == {"model_type": "x", "torch_dtype": "bfloat16", "text_config": {}}
        assert "quantization_config" in config["text_config"]  # the input is left alone


# --- dequantization, bit for bit --------------------------------------------------------------------


def _bnb_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


class TestDequantization:
    @pytest.mark.parametrize("key", list(BNB4))
    def test_bnb_4bit_checkpoint(self, bases, opened, key):
        import bitsandbytes.functional as bnbf
        from transformers import AutoModelForCausalLM

        stored = _bnb_state_dict(bases[key])
        _, qbase, read = opened(bases[key])
        dequantized = AutoModelForCausalLM.from_pretrained(bases[key], device_map="cpu", dtype=torch.float32)
        dequantized = dequantized.dequantize().state_dict()
        for name, t in qbase.tensors.items():
            parts = {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(name + ".")}
            state = bnbf.QuantState.from_dict(parts, device=torch.device("cpu"))
            default = bnbf.dequantize_4bit(stored[name], state)  # in the quant state's dtype
            state.dtype = torch.float32
            want = bnbf.dequantize_4bit(stored[name], state)
            got = dequantize_tensor(t, read)
            assert_bitwise(got, want)
            assert_bitwise(got.to(default.dtype), default)
            assert_bitwise(got.to(dequantized[name].dtype), dequantized[name])
            if name in ROW_BLOCK_CHECKS:
                assert_row_blocks_equal(t, read, want)

    @pytest.mark.parametrize(
        ("shape", "blocksize", "storage"),
        [((64, 96), 64, torch.uint8), ((192, 96), 64, torch.uint8), ((33, 130), 128, torch.uint8),
         ((96, 64), 64, torch.bfloat16), ((40, 24), 32, torch.uint8)],
    )  # fmt: skip
    @pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
    @pytest.mark.parametrize("double", [False, True])
    def test_bnb_4bit_blocks_across_rows(self, shape, blocksize, storage, quant_type, double):
        """Quantization blocks that straddle rows, several nested blocks, and bf16 quant_storage."""
        import bitsandbytes.functional as bnbf
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code

        torch.manual_seed(0)
        state = bnb4_state(torch.randn(shape, dtype=torch.bfloat16), "w", blocksize=blocksize,
                           quant_type=quant_type, compress_statistics=double, quant_storage=storage)  # fmt: skip
        qbase = resolve_shapes(detect_quantization({}, header_of(state)), dict_reader(state))
        t = qbase.tensors["w"]
        assert t.shape == shape and t.bnb4.nested is double
        qs = bnbf.QuantState.from_dict({k[2:]: v for k, v in state.items() if k != "w"}, device=torch.device("cpu"))
        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if double else qs.absmax
        # bitsandbytes' portable kernel: the flat block layout that quantize_4bit (and CUDA) use. Its CPU C
        # kernel indexes blocks per row instead and disagrees when cols is not a multiple of the blocksize.
        raw = state["w"].view(torch.uint8).reshape(-1)
        compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
        # In the quant state's dtype (bfloat16 here, the weight's), as dequantize_4bit returns it by default.
        want = compute(raw, absmax, _get_4bit_code(quant_type, raw.device), blocksize, shape, qs.dtype).float()
        # FP4 code 0b1000 is -0.0: the C kernel we call writes +0.0 for it in some loop tails, the portable one -0.0.
        sign = {"zero_sign": quant_type != "fp4"}
        assert_bitwise(dequantize_tensor(t, dict_reader(state)), want, **sign)
        assert_row_blocks_equal(t, dict_reader(state), want, **sign)
        if shape[1] % blocksize == 0:  # where bitsandbytes' CPU kernel keeps the flat layout, it is the reference too
            assert_bitwise(
                dequantize_tensor(t, dict_reader(state)), bnbf.dequantize_4bit(state["w"], qs).float(), **sign
            )

    def test_bnb_8bit(self, bases, opened):
        import bitsandbytes.functional as bnbf
        from transformers import AutoModelForCausalLM

        stored = _bnb_state_dict(bases["int8"])
        _, qbase, read = opened(bases["int8"])
        dequantized = AutoModelForCausalLM.from_pretrained(bases["int8"], device_map="cpu", dtype=torch.float32)
        dequantized = dequantized.dequantize().state_dict()
        for name, t in qbase.tensors.items():
            want = bnbf.int8_vectorwise_dequant(stored[name], stored[t.parts["scb"]])
            assert_bitwise(dequantize_tensor(t, read), want)
            assert_bitwise(dequantize_tensor(t, read), dequantized[name])
            if name in ROW_BLOCK_CHECKS:
                assert_row_blocks_equal(t, read, want)

    @pytest.mark.parametrize("key", list(FP8))
    def test_fp8_against_transformers_loader(self, bases, opened, key):
        from transformers import AutoModelForCausalLM

        # Without a GPU transformers dequantizes FP8 checkpoints while loading: the reference.
        loaded = AutoModelForCausalLM.from_pretrained(bases[key], dtype=torch.float32).state_dict()
        _, qbase, read = opened(bases[key])
        for name, t in qbase.tensors.items():
            assert_bitwise(dequantize_tensor(t, read), loaded[name])
            if name in ROW_BLOCK_CHECKS:
                assert_row_blocks_equal(t, read, loaded[name])

    def test_fp8_ragged_edge_blocks(self):
        """128x128-style blocks that do not divide the weight: edge blocks are cut, as FP8Linear reads them."""
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

        torch.manual_seed(0)
        q, s = fp8_quantize(torch.randn(70, 100), (24, 32))
        state = {"l.weight": q, "l.weight_scale_inv": s}
        config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [24, 32]}}
        t = detect_quantization(config, header_of(state)).tensors["l.weight"]
        want = _dequantize_fp8_weight(q, s, [24, 32], torch.float32)
        assert_bitwise(dequantize_tensor(t, dict_reader(state)), want)
        assert_row_blocks_equal(t, dict_reader(state), want)

    def test_row_alignment(self, bases, opened):
        _, nested, _ = opened(bases["nf4-dq"])
        _, flat, _ = opened(bases["nf4"])
        _, fp8, _ = opened(bases["fp8-block"])
        name = "model.layers.0.self_attn.q_proj.weight"
        assert nested.tensors[name].row_alignment() == 64 * 256 // 64  # 256 nested blocks of 64 values per 64-col row
        assert flat.tensors[name].row_alignment() == 1 and fp8.tensors[name].row_alignment() == 16


# --- the reference the merge must match ---------------------------------------------------------------


def _dequantized_model(folder: Path, opened):
    """A plain float32 model holding dequantize(W) for every quantized weight, built from the plain config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base, qbase, read = opened(folder)
    state = {}
    for name, info in ((n, t.info) for n, t in base.tensors.items() if n not in qbase.auxiliary):
        state[name] = dequantize_tensor(qbase.tensors[name], read) if name in qbase.tensors else None
        if state[name] is None:
            state[name] = read_tensor(base.tensors[name].shard, info).to(torch.float32)
    config = plain_config(base.config, torch.float32)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("key", [*BNB4, "int8"])
def test_dequantized_base_plus_lora_matches_peft_on_the_quantized_base(bases, opened, tmp_path, key):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(bases["float"], tmp_path / "adapter")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    quantized = AutoModelForCausalLM.from_pretrained(bases[key], device_map="cpu", dtype=torch.float32)
    trained = PeftModel.from_pretrained(quantized, adapter)
    # Train mode with every dropout at 0 is what training computed: in eval mode bitsandbytes on CPU
    # repacks 4-bit weights with bfloat16 absmax (AVX512-BF16 CPUs) and runs 8-bit as an int8 matmul.
    trained.train()
    merged = PeftModel.from_pretrained(_dequantized_model(bases[key], opened), adapter).eval()
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["float"]), adapter).eval()
    with torch.no_grad():
        want, got, from_original = trained(ids).logits, merged(ids).logits, original(ids).logits
    assert (got - want).abs().max().item() < 1e-4
    # The 16-bit original the quantized repo was made from is measurably another model.
    assert (from_original - want).abs().max().item() > 1e-3


# --- the requantized target ------------------------------------------------------------------------------


def _dequantized_weights(folder: Path, opened) -> dict[str, torch.Tensor]:
    _, qbase, read = opened(folder)
    return {name: dequantize_tensor(t, read) for name, t in qbase.tensors.items()}


@pytest.mark.parametrize("key", ["nf4", "fp4", "nf4-dq", "int8"])
def test_requantize_writes_the_same_bitsandbytes_settings(bases, opened, tmp_path, key):
    from transformers import AutoModelForCausalLM

    _, qbase, _ = opened(bases[key])
    plain = tmp_path / "plain"
    _dequantized_model(bases[key], opened).save_pretrained(plain)
    (plain / "tokenizer_config.json").write_text("{}")
    out = requantize(plain, tmp_path / "requantized", settings=bnb_settings(qbase))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == qbase.quantization_config and (out / "tokenizer_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out, device_map="cpu")  # loads as any -bnb-4bit repo does
    before, after = _dequantized_weights(bases[key], opened), _dequantized_weights(out, opened)
    worst = max((before[n] - after[n]).abs().max().item() for n in before)
    if key == "nf4-dq":
        # The 8-bit absmax is quantized again around a new offset: a small, real cost.
        assert 0 < worst < 1e-3
    else:
        # Without double quantization, quantize(dequantize(W)) gives back W's blocks: nothing lost.
        assert worst == 0


def test_requantize_refuses_what_transformers_cannot_write(bases, opened):
    _, fp8, _ = opened(bases["fp8-block"])
    with pytest.raises(UnsupportedQuantizationError, match="not a bitsandbytes checkpoint"):
        bnb_settings(fp8)
    state = bnb4_state(torch.randn(64, 64), "w", blocksize=128, quant_type="nf4")
    odd = resolve_shapes(detect_quantization({}, header_of(state)), dict_reader(state))
    with pytest.raises(UnsupportedQuantizationError, match="blocks of 64"):
        bnb_settings(odd)


# --- streaming: a row block reads about a row block ------------------------------------------------------


class _RecordingReader:
    def __init__(self, state: dict[str, torch.Tensor]):
        self.read, self.calls = dict_reader(state), []

    def __call__(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        self.calls.append((name, start, stop))
        return self.read(name, start, stop)

    def rows(self, name: str) -> int:
        return sum(stop - start for n, start, stop in self.calls if n == name and stop is not None)


@pytest.mark.parametrize(("start", "stop"), [(200, 231), (0, 1), (511, 512)])
def test_a_row_block_reads_only_its_quantization_blocks(start, stop):
    torch.manual_seed(0)
    rows, cols = 512, 96  # 768 blocks of 64 values, three nested blocks of 256: more than any bound below
    state = bnb4_state(torch.randn(rows, cols), "w", blocksize=64, quant_type="nf4", compress_statistics=True)
    qbase = resolve_shapes(detect_quantization({}, header_of(state)), dict_reader(state))
    reader = _RecordingReader(state)
    dequantize_rows(qbase.tensors["w"], reader, start, stop)
    values = (stop - start) * cols
    assert reader.rows("w") <= values // 2 + 64  # packed bytes: the rows plus at most a block on each side
    assert reader.rows("w.absmax") <= 2 * 256  # 8-bit absmax codes travel in whole nested blocks of 256
    assert reader.rows("w.nested_absmax") <= 2
    whole = {name for name, _, stop_ in reader.calls if stop_ is None}
    assert whole == {"w.nested_quant_map"}  # 256 floats; nothing weight-sized is ever read whole
