"""Every PEFT type the registry merges equals PEFT's own merge_and_unload, row block by row block, in float64.

Each case builds a tiny model, gives a PEFT adapter random (non-identity) weights, saves it, and merges it
twice: PEFT's merge_and_unload on the float64 model, and the registry's specs applied to the float64 base
over row blocks of several sizes. Every other PeftType must be refused by name with a reason.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch

from merge_core.errors import ShapeMismatchError, UnsupportedAdapterError
from merge_core.peft_types import REGISTRY, peft_type_support, plan_adapter, record_for
from merge_core.peft_types.ops import ColumnRotation
from merge_core.peft_types.orthogonal import BoftSpec
from tests.peft_types_cases import (
    build_case,
    gpt2_config,
    gpt_oss_config,
    llama_config,
    max_relative_error,
    moe_config,
    resolver,
    streamed,
)

EXACT = 1e-10


def _configs():
    from peft import (
        AdaLoraConfig,
        BOFTConfig,
        DeloraConfig,
        HiraConfig,
        HRAConfig,
        IA3Config,
        LNTuningConfig,
        LoHaConfig,
        LoKrConfig,
        LoraConfig,
        OFTConfig,
        PveraConfig,
        TrainableTokensConfig,
        VBLoRAConfig,
        VeraConfig,
    )
    from peft.tuners.lora.config import BdLoraConfig

    warnings.simplefilter("ignore")  # PEFT's config warnings (VeRA without saved projections) address training
    adalora = dict(init_r=6, lora_alpha=16, total_step=10)
    return {
        "adalora": (llama_config(), AdaLoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **adalora)),
        "adalora-conv1d": (
            gpt2_config(),
            AdaLoraConfig(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, **adalora),
        ),
        "ia3": (
            llama_config(),
            IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        ),
        "ia3-conv1d": (
            gpt2_config(),
            IA3Config(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True, feedforward_modules=["mlp.c_proj"]),
        ),
        "loha": (
            llama_config(),
            LoHaConfig(
                target_modules=["q_proj", "down_proj"],
                r=4,
                alpha=8,
                rank_pattern={"down_proj": 2},
                alpha_pattern={"q_proj": 3},
            ),
        ),
        "lokr-decomposed": (
            llama_config(),
            LoKrConfig(target_modules=["q_proj", "up_proj", "down_proj"], r=2, alpha=5, decompose_both=True),
        ),
        "lokr-full": (
            llama_config(),
            LoKrConfig(target_modules=["q_proj", "down_proj"], r=16, alpha=5, decompose_factor=4),
        ),
        "oft": (
            llama_config(),
            OFTConfig(target_modules=["q_proj", "down_proj", "embed_tokens"], r=0, oft_block_size=4),
        ),
        "oft-coft-shared-cayley": (
            llama_config(),
            OFTConfig(
                target_modules=["q_proj", "down_proj"],
                r=0,
                oft_block_size=8,
                coft=True,
                block_share=True,
                use_cayley_neumann=False,
            ),
        ),
        "boft": (llama_config(), BOFTConfig(target_modules=["q_proj", "down_proj"], boft_block_size=4)),
        "vera-saved": (
            llama_config(),
            VeraConfig(target_modules=["q_proj", "up_proj", "down_proj"], r=6, save_projection=True),
        ),
        "vera-regenerated-conv1d": (
            gpt2_config(),
            VeraConfig(
                target_modules=["c_attn", "c_fc", "mlp.c_proj"], r=6, save_projection=False, fan_in_fan_out=True
            ),
        ),
        "trainable-tokens-tied": (
            llama_config(tie_word_embeddings=True),
            TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 5, 39]),
        ),
        "hra": (llama_config(), HRAConfig(target_modules=["q_proj", "down_proj"], r=4)),
        "hra-gram-schmidt": (llama_config(), HRAConfig(target_modules=["q_proj", "down_proj"], r=3, apply_GS=True)),
        "vblora": (
            llama_config(),
            VBLoRAConfig(target_modules=["q_proj", "down_proj"], r=4, vector_length=8, num_vectors=16, topk=3),
        ),
        "hira": (llama_config(), HiraConfig(target_modules=["q_proj", "down_proj", "embed_tokens"], r=4)),
        "hira-conv1d": (gpt2_config(), HiraConfig(target_modules=["c_attn", "mlp.c_proj"], r=4, fan_in_fan_out=True)),
        "delora": (
            llama_config(),
            DeloraConfig(target_modules=["q_proj", "down_proj"], r=4, rank_pattern={"q_proj": 2}),
        ),
        "pvera-saved": (llama_config(), PveraConfig(target_modules=["q_proj", "up_proj", "down_proj"], r=3)),
        "pvera-regenerated-conv1d": (
            gpt2_config(),
            PveraConfig(target_modules=["c_attn", "c_fc"], r=3, save_projection=False, fan_in_fan_out=True),
        ),
        "ln-tuning": (gpt2_config(), LNTuningConfig(target_modules=["ln_1", "ln_f"])),
        "lora-bdlora": (
            llama_config(),
            LoraConfig(
                r=4,
                target_modules=["q_proj", "v_proj"],
                use_bdlora=BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"], nblocks=2),
            ),
        ),
        "lora-target-parameters-moe": (
            moe_config(),
            LoraConfig(
                r=2,
                lora_alpha=4,
                target_modules=[],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            ),
        ),
        "lora-target-parameters-gpt-oss": (
            gpt_oss_config(),
            LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["gate_up_proj", "down_proj"]),
        ),
        "lora-bias-tokens-conv1d": (
            gpt2_config(),
            LoraConfig(
                r=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True, trainable_token_indices=[2, 3]
            ),
        ),
    }


with warnings.catch_warnings():
    CASES = list(_configs())
# Tied output embeddings stored as their own tensor take the embedding's row replacements.
TIED = {
    "trainable-tokens-tied": {"lm_head.weight": "model.embed_tokens.weight"},
    "lora-bias-tokens-conv1d": {"lm_head.weight": "transformer.wte.weight"},
}


def _changed(case) -> set[str]:
    return {k for k, v in case.merged.items() if not torch.equal(v, case.base[k])}


class TestEqualsPeftMerge:
    @pytest.mark.parametrize("name", CASES)
    def test_streamed_rows_equal_merge_and_unload(self, name: str, tmp_path: Path) -> None:
        with warnings.catch_warnings():
            model_config, peft_config = _configs()[name]
        case = build_case(tmp_path, model_config, peft_config)
        results = streamed(case, tied=TIED.get(name))
        changed = _changed(case)
        assert changed, "the adapter must change the model, or the comparison proves nothing"
        assert set(results[1]) == changed
        assert max_relative_error(case, results) <= EXACT
        # Specs are plain data: a plan holding them can cross a process boundary (ZeroGPU workers).
        specs = plan_adapter(case.config_raw, case.shapes, resolver(case))
        assert pickle.loads(pickle.dumps(specs)) == specs
        assert all(spec.describe() for module_specs in specs.values() for spec in module_specs)

    def test_adalora_pruned_ranks_keep_init_r_scaling(self, tmp_path: Path) -> None:
        from peft import AdaLoraConfig

        def prune(model) -> None:  # what AdaLoRA's rank allocator leaves in the config after training
            model.peft_config["default"].rank_pattern = {
                "model.layers.0.self_attn.q_proj.lora_E.default": [True, False, True, False, True, True],
                "model.layers.0.self_attn.v_proj.lora_E.default": [False] * 6,
            }

        config = AdaLoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_r=6, lora_alpha=16, total_step=9)
        case = build_case(tmp_path, llama_config(), config, edit=prune)
        assert case.shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A"] == (4, 32)
        results = streamed(case)
        assert (
            set(results[1])
            == _changed(case)
            == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"}
        )
        assert max_relative_error(case, results) <= EXACT

    def test_kasa_equals_peft_up_to_its_float32_svd(self, tmp_path: Path) -> None:
        # PEFT truncates the base by an SVD computed in float32; the registry computes it in float64.
        from peft import LoraConfig
        from peft.tuners.lora.config import KasaConfig

        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], kasa_config=KasaConfig())
        case = build_case(tmp_path, llama_config(), config)
        results = streamed(case)
        assert set(results[1]) == _changed(case)
        assert max_relative_error(case, results) <= 1e-6

    def test_vblora_top_k_only_equals_peft_up_to_its_float32_logits(self, tmp_path: Path) -> None:
        # With save_only_topk_weights PEFT turns the saved weights back into float32 logits (log) before its
        # softmax; the registry uses the saved weights directly.
        from peft import VBLoRAConfig

        config = VBLoRAConfig(
            target_modules=["c_attn", "mlp.c_proj"],
            r=4,
            vector_length=8,
            num_vectors=16,
            topk=3,
            save_only_topk_weights=True,
            fan_in_fan_out=True,
        )
        case = build_case(tmp_path, gpt2_config(), config)
        assert any(k.endswith("_topk_weights") for k in case.adapter)
        results = streamed(case)
        assert set(results[1]) == _changed(case)
        assert max_relative_error(case, results) <= 1e-6

    @pytest.mark.parametrize("init", ["pissa", "olora"])
    def test_unconverted_pissa_and_olora_rebuild_peft_residual_base(self, init: str, tmp_path: Path) -> None:
        # PEFT re-runs the initialisation on load (in float32, which it requires): base - B0 A0, then + B A.
        from peft import LoraConfig

        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=init)
        case = build_case(tmp_path, llama_config(), config, reference_dtype=torch.float32)
        results = streamed(case)
        assert set(results[1]) == _changed(case)
        assert max_relative_error(case, results) <= 1e-6

    @pytest.mark.parametrize("conv1d", [False, True])
    def test_fourierft_equals_peft_to_float32_and_its_formula_in_float64(self, conv1d: bool, tmp_path: Path) -> None:
        # PEFT forms its dense spectrum and ifft2 in float32; the same formula in float64 is matched exactly.
        from peft import FourierFTConfig

        targets = ["c_attn", "mlp.c_proj"] if conv1d else ["q_proj", "down_proj"]
        config = FourierFTConfig(
            target_modules=targets,
            n_frequency=40,
            scaling=100.0,
            fan_in_fan_out=conv1d,
            n_frequency_pattern={targets[1].split(".")[-1]: 25},
        )
        case = build_case(tmp_path, gpt2_config() if conv1d else llama_config(), config)
        results = streamed(case)
        assert set(results[1]) == _changed(case)
        assert max_relative_error(case, results) <= 1e-6
        for name, value in results[1].items():
            key = next(k for k in case.adapter if k.startswith("base_model.model." + name.rsplit(".", 1)[0]))
            spectrum = case.adapter[key].double()
            out_f, in_f = value.shape[::-1] if conv1d else value.shape
            flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(777))[: spectrum.numel()]
            dense = torch.zeros(out_f, in_f, dtype=torch.float64)
            dense[flat // in_f, flat % in_f] = spectrum
            delta = torch.fft.ifft2(dense).real * 100.0
            expected = case.base[name] + (delta.T if conv1d else delta)
            assert torch.allclose(value, expected, rtol=0, atol=EXACT)


class TestRowOps:
    def test_boft_with_several_butterfly_factors_equals_peft_dense_product(self) -> None:
        # PEFT builds more than one butterfly factor only with its CUDA extension; this rebuilds its dense
        # matrix M = prod P_i D_i P_i^T from PEFT's own permutations and compares W @ M^T.
        from peft.tuners.boft.layer import BOFTLayer

        n, blocks, size, out_f = 3, 8, 4, 5
        in_f = blocks * size
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(n, blocks, size, size, generator=gen, dtype=torch.float64) * 0.3
        base = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
        rot = BOFTLayer.cayley_batch(None, weight.reshape(-1, size, size)).reshape(n, blocks, size, size)
        dense = torch.eye(in_f, dtype=torch.float64)
        for i in range(n):
            perm = BOFTLayer.block_butterfly_perm(None, in_f, blocks // 2**i, size // 2, n - 1)
            p = BOFTLayer.perm2mat(None, perm).double()
            dense = p @ torch.block_diag(*rot[i]) @ p.T @ dense
        op = BoftSpec("m", "weight", "R", size, blocks, n).load({"R": weight}.__getitem__)
        assert isinstance(op, ColumnRotation)
        mine = base.clone()
        for a in range(0, out_f, 2):
            op.apply_(mine[a : a + 2], a)
        assert torch.allclose(mine, base @ dense.T, rtol=0, atol=EXACT)

    def test_specs_are_plain_picklable_data_with_a_description(self, tmp_path: Path) -> None:
        from peft import LoHaConfig

        config = LoHaConfig(target_modules=["q_proj"], r=4, alpha=8)
        case = build_case(tmp_path, llama_config(), config)
        specs = plan_adapter(case.config_raw, case.shapes, resolver(case))["model.layers.0.self_attn.q_proj"]
        assert pickle.loads(pickle.dumps(specs)) == specs
        assert [s.describe() for s in specs] == ["loha r=4 alpha=8"]


class TestRefusals:
    def test_every_peft_type_is_merged_or_refused_by_name(self) -> None:
        from peft.utils import PeftType

        assert {m.value for m in PeftType} <= set(REGISTRY), "a PeftType without its own record"
        rows = peft_type_support()
        assert [r[0] for r in rows] == [m.value for m in PeftType]
        merged = {t for t, status, _ in rows if status == "merged"}
        assert merged == {
            "LORA",
            "ADALORA",
            "IA3",
            "LOHA",
            "LOKR",
            "OFT",
            "BOFT",
            "VERA",
            "TRAINABLE_TOKENS",
            "LN_TUNING",
            "FOURIERFT",
            "HRA",
            "VBLORA",
            "HIRA",
            "DELORA",
            "PVERA",
        }
        for peft_type, status, reason in rows:
            assert reason, peft_type
            if status == "refused":
                with pytest.raises(UnsupportedAdapterError, match=peft_type):
                    record_for(peft_type)
        prompt = dict((t, r) for t, _, r in rows)
        for peft_type in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "ADAPTION_PROMPT"):
            assert "nothing to merge" in prompt[peft_type]

    @pytest.mark.parametrize(
        ("option", "value", "named"),
        [
            ("use_dora", True, "DoRA"),
            ("arrow_config", {"top_k": 2}, "arrow_config"),
            ("alora_invocation_tokens", [1, 2], "alora_invocation_tokens"),
            ("use_qalora", True, "QA-LoRA"),
            ("init_lora_weights", "pissa_niter_4", "init_lora_weights='pissa_niter_4'"),
        ],
    )
    def test_lora_variants_it_does_not_reproduce_are_refused_by_name(self, option: str, value, named: str) -> None:
        keys = {"lora_A": "q.lora_A.weight", "lora_B": "q.lora_B.weight"}
        shapes = {"q.lora_A.weight": (2, 8), "q.lora_B.weight": (8, 2)}
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2}
        lora = record_for("LORA")
        assert lora.module_ops("q", keys, config, (8, 8), stored_transposed=False, adapter_shapes=shapes)
        with pytest.raises(UnsupportedAdapterError, match=f"^q: this LORA adapter .*{named}"):
            lora.module_ops(
                "q", keys, {**config, option: value}, (8, 8), stored_transposed=False, adapter_shapes=shapes
            )

    def test_adalora_rank_must_be_what_its_rank_pattern_keeps(self) -> None:
        from merge_core.errors import AdapterConfigError

        keys = {"lora_A": "q.lora_A", "lora_B": "q.lora_B", "lora_E": "q.lora_E"}
        shapes = {"q.lora_A": (3, 8), "q.lora_B": (8, 3), "q.lora_E": (3, 1)}
        config = {"peft_type": "ADALORA", "init_r": 4, "rank_pattern": {"q.lora_E": [True, False, True, True]}}
        adalora = record_for("ADALORA")
        assert adalora.module_ops("q", keys, config, (8, 8), stored_transposed=False, adapter_shapes=shapes)
        config["rank_pattern"] = {"q.lora_E": [True, False, False, True]}
        with pytest.raises(AdapterConfigError, match="^q: adapter_config.json gives this module rank 2"):
            adalora.module_ops("q", keys, config, (8, 8), stored_transposed=False, adapter_shapes=shapes)

    def test_shape_mismatch_names_the_module(self) -> None:
        keys = {r: f"m.{r}" for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        shapes = {"m.hada_w1_a": (8, 2), "m.hada_w1_b": (2, 4), "m.hada_w2_a": (8, 2), "m.hada_w2_b": (2, 4)}
        config = {"peft_type": "LOHA", "r": 2, "alpha": 2}
        loha = record_for("LOHA")
        assert loha.module_ops("m", keys, config, (8, 4), stored_transposed=False, adapter_shapes=shapes)
        with pytest.raises(ShapeMismatchError, match=r"^layer\.q: LoHa factor"):
            loha.module_ops("layer.q", keys, config, (8, 6), stored_transposed=False, adapter_shapes=shapes)

    def test_convolutions_and_conv1d_layouts_are_refused_by_type(self) -> None:
        keys, shapes = {"ia3_l": "c.ia3_l"}, {"c.ia3_l": (1, 8, 1, 1)}
        with pytest.raises(UnsupportedAdapterError, match=r"^conv: this IA3 adapter targets a 4-D weight"):
            record_for("IA3").module_ops("conv", keys, {}, (8, 3, 3, 3), stored_transposed=False, adapter_shapes=shapes)
        keys = {"oft_R": "q.oft_R.weight"}
        with pytest.raises(UnsupportedAdapterError, match="Conv1D"):
            record_for("OFT").module_ops(
                "q",
                keys,
                {"peft_type": "OFT", "oft_block_size": 4, "r": 0},
                (8, 8),
                stored_transposed=True,
                adapter_shapes={"q.oft_R.weight": (2, 6)},
            )


class TestKeys:
    def test_keys_group_by_module_in_every_saved_layout(self) -> None:
        keys = [
            "base_model.model.model.layers.0.self_attn.q_proj.hada_w1_a",  # PEFT's layout
            "model.layers.0.self_attn.q_proj.hada_w1_b.default",  # no prefix, adapter-name infix
            "base_model.model.lm_head.modules_to_save.weight",  # not LoHa's: the LoRA planner places it
        ]
        loha = record_for("LOHA")
        assert loha.parse_adapter(keys) == {
            "model.layers.0.self_attn.q_proj": {"hada_w1_a": keys[0], "hada_w1_b": keys[1]}
        }
        assert loha.unclaimed_keys(keys) == [keys[2]]

    def test_nested_parameter_wrappers_and_shared_tensors(self) -> None:
        lora = record_for("LORA")
        keys = ["base_model.model.m.experts.base_layer.lora_A.weight", "base_model.model.m.experts.lora_A.weight"]
        assert lora.parse_adapter(keys) == {"m.experts": {"lora_A@1": keys[0], "lora_A": keys[1]}}
        vera = record_for("VERA")
        keys = ["base_model.vera_A", "base_model.vera_B", "base_model.model.q.vera_lambda_b"]
        assert vera.shared_keys(keys) == {"vera_A": keys[0], "vera_B": keys[1]}
        assert vera.unclaimed_keys(keys) == []

    def test_regenerated_vera_projections_need_the_whole_adapter(self) -> None:
        from merge_core.errors import AdapterConfigError

        keys = {"vera_lambda_b": "q.vera_lambda_b", "vera_lambda_d": "q.vera_lambda_d"}
        shapes = {"q.vera_lambda_b": (8,), "q.vera_lambda_d": (4,)}
        config = {"peft_type": "VERA", "r": 4, "save_projection": False}
        with pytest.raises(AdapterConfigError, match="plan_adapter"):
            record_for("VERA").module_ops("q", keys, config, (8, 8), stored_transposed=False, adapter_shapes=shapes)
