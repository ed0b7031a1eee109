"""One adapter per family: its transformers class, its tensor table (`sources`)
and its config.json fields, both ways; registered in ADAPTERS."""

from __future__ import annotations

import torch

from megagpt.hf.fields import _Fields, _read_rope, _refuse_unless, _rope_config
from megagpt.hf.mapping import Source, Tensors, copied, fused, transposed
from megagpt.model.config import GPTConfig
from megagpt.model.families import family


class Adapter:
    """How one family maps onto its transformers class.  Subclasses set the
    names and implement body_sources, config and config_from_hf."""

    family: str  # megagpt's family (model/families.py)
    model_type: str  # config.json's model_type
    architecture: str  # the transformers class
    prefix: str  # the base model's name in the class's tensor names ("model.")

    def body_sources(self, c: GPTConfig) -> dict[str, Source]:
        """sources() but the output head."""
        raise NotImplementedError

    def sources(self, c: GPTConfig) -> dict[str, Source]:
        """megagpt parameter name (as GPT(c).named_parameters() lists them: a
        tied lm_head.weight left out) -> the transformers tensors it is made of."""
        table = self.body_sources(c)
        if not c.tie_embeddings:
            table["lm_head.weight"] = copied("lm_head.weight")
        return table

    def hf_only(self, sd: Tensors, c: GPTConfig) -> Tensors:
        """Tensors the transformers class has and the megagpt model does not
        (export writes them; import ignores them)."""
        return {}

    def config(self, c: GPTConfig) -> dict:
        """The family's config.json fields (beside the common ones)."""
        raise NotImplementedError

    def config_from_hf(self, cfg: dict) -> GPTConfig:
        """A GPTConfig from the class's config.json fields (folders made
        elsewhere); raises _Refused or ConfigError (parse_hf_config words them)."""
        raise NotImplementedError


class GPT2Adapter(Adapter):
    family, model_type, architecture, prefix = "gpt2", "gpt2", "GPT2LMHeadModel", "transformer."
    # block: (megagpt module, GPT2 module, weight stored transposed there: Conv1D is (in, out)).
    BLOCK = (
        ("ln_1", "ln_1", False),
        ("attn.qkv", "attn.c_attn", True),
        ("attn.proj", "attn.c_proj", True),
        ("ln_2", "ln_2", False),
        ("mlp.fc", "mlp.c_fc", True),
        ("mlp.proj", "mlp.c_proj", True),
    )
    # GPT2Config's defaults (transformers), for keys a config.json leaves out.
    DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
    # GELU's tanh approximation, which megagpt computes (layers.GeluMLP).
    ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

    def _modules(self, c: GPTConfig):
        """(megagpt module, transformers module, transposed) for every block."""
        for i in range(c.n_layer):
            for ours, theirs, transpose in self.BLOCK:
                yield f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", transpose

    def body_sources(self, c):
        table = {"wte.weight": copied("transformer.wte.weight"), "wpe.weight": copied("transformer.wpe.weight")}
        for ours, theirs, transpose in self._modules(c):
            table[f"{ours}.weight"] = (transposed if transpose else copied)(f"{theirs}.weight")
            if c.bias:
                table[f"{ours}.bias"] = copied(f"{theirs}.bias")
        table["ln_f.weight"] = copied("transformer.ln_f.weight")
        if c.bias:
            table["ln_f.bias"] = copied("transformer.ln_f.bias")
        return table

    def hf_only(self, sd, c):
        if c.bias:
            return {}
        # GPT-2 always has biases: a bias-free megagpt model exports zeros.
        out = {f"{theirs}.bias": torch.zeros(sd[f"{ours}.weight"].shape[0]) for ours, theirs, _ in self._modules(c)}
        out["transformer.ln_f.bias"] = torch.zeros(c.n_embd)
        return out

    def config(self, c):
        return {
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_embd": c.n_embd,
            "n_positions": c.max_seq_len,
            "n_ctx": c.max_seq_len,  # GPT2Config no longer reads it; llama.cpp's converter does
            "n_inner": c.mlp_hidden,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": c.init_std,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }

    def config_from_hf(self, cfg):
        f, d = _Fields(cfg), self.DEFAULTS
        act = f.text("activation_function", "gelu_new")
        _refuse_unless(
            act in self.ACTIVATIONS,
            f"activation_function {act!r} is not supported (supported: {', '.join(self.ACTIVATIONS)})",
        )
        _refuse_unless(
            f.flag("scale_attn_weights", True),
            "scale_attn_weights false (attention scores not scaled by 1/sqrt(head dim)) is not supported",
        )
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            _refuse_unless(not f.flag(key, False), f"{key} true is not supported")
        n_embd = f.int("n_embd", d["n_embd"])
        n_inner = f.int("n_inner", None, nullable=True)  # null: 4 x n_embd, as GPT2MLP sizes it
        return GPTConfig(
            vocab_size=f.int("vocab_size", d["vocab_size"]),
            max_seq_len=f.int("n_positions", d["n_positions"]),
            family=self.family,
            n_layer=f.int("n_layer", d["n_layer"]),
            n_head=f.int("n_head", d["n_head"]),
            n_embd=n_embd,
            mlp_hidden=4 * n_embd if n_inner is None else n_inner,
            bias=True,
            norm_eps=f.float("layer_norm_epsilon", 1e-5),
            init_std=f.float("initializer_range", 0.02),
            tie_embeddings=f.flag("tie_word_embeddings", True),
        )


class LlamaAdapter(Adapter):
    family, model_type, architecture, prefix = "llama", "llama", "LlamaForCausalLM", "model."
    # LlamaConfig's defaults (transformers), for keys a config.json leaves out.
    DEFAULTS = {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    ACTIVATIONS = ("silu", "swish")  # both SiLU in transformers' ACT2FN

    @staticmethod
    def block(c: GPTConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...] | None]]:
        """(megagpt tensor, the transformers tensors it holds, their row counts
        where it fuses several), in the block's parameter order. Fused here,
        separate there: q/k/v and gate/up."""
        H, KV, D, F = c.n_head, c.n_kv_head, c.head_dim, c.mlp_hidden
        row = c.family_spec

        def linear(ours, theirs, sizes, bias):
            kinds = ("weight", "bias") if bias else ("weight",)
            return [(f"{ours}.{kind}", tuple(f"{name}.{kind}" for name in theirs), sizes) for kind in kinds]

        table = [("ln_1.weight", ("input_layernorm.weight",), None)]
        qkv = tuple(f"self_attn.{x}_proj" for x in "qkv")
        table += linear("attn.qkv", qkv, (H * D, KV * D, KV * D), c.bias or row.qkv_bias)
        if row.qk_norm:  # Qwen3
            table += [(f"attn.{x}_norm.weight", (f"self_attn.{x}_norm.weight",), None) for x in "qk"]
        table += linear("attn.proj", ("self_attn.o_proj",), None, c.bias)
        table.append(("ln_2.weight", ("post_attention_layernorm.weight",), None))
        table += linear("mlp.fc", ("mlp.gate_proj", "mlp.up_proj"), (F, F), c.bias)
        table += linear("mlp.proj", ("mlp.down_proj",), None, c.bias)
        return table

    def body_sources(self, c):
        table = {"wte.weight": copied("model.embed_tokens.weight")}
        for i in range(c.n_layer):
            for ours, theirs, sizes in self.block(c):
                names = tuple(f"model.layers.{i}.{name}" for name in theirs)
                table[f"blocks.{i}.{ours}"] = fused(names, sizes) if sizes else copied(names[0])
        table["ln_f.weight"] = copied("model.norm.weight")
        return table

    def shape_config(self, c: GPTConfig) -> dict:
        """The fields Llama and Mistral share."""
        return {
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "hidden_size": c.n_embd,
            "head_dim": c.head_dim,
            "intermediate_size": c.mlp_hidden,
            "hidden_act": "silu",
            "rms_norm_eps": c.norm_eps,
            "max_position_embeddings": c.max_seq_len,
            **_rope_config(c),
            "attention_dropout": 0.0,
            "initializer_range": c.init_std,
        }

    def config(self, c):
        return {**self.shape_config(c), "attention_bias": c.bias, "mlp_bias": c.bias, "pretraining_tp": 1}

    def read_shape(self, f: _Fields) -> dict:
        """GPTConfig's fields from what Llama and Mistral share, checked."""
        d = self.DEFAULTS
        act = f.text("hidden_act", "silu")
        _refuse_unless(
            act in self.ACTIVATIONS, f"hidden_act {act!r} is not supported (supported: {', '.join(self.ACTIVATIONS)})"
        )
        hidden, heads = f.int("hidden_size", d["hidden_size"]), f.int("num_attention_heads", d["num_attention_heads"])
        if family(self.family).own_head_dim:  # Qwen3: a head size of its own, 128 where absent
            head_dim = f.int("head_dim", d["head_dim"])
        else:
            _refuse_unless(
                heads > 0 and hidden % heads == 0,
                f"hidden_size {hidden} is not divisible by num_attention_heads {heads}",
            )
            head_dim = f.int("head_dim", None, nullable=True)
            _refuse_unless(
                head_dim in (None, hidden // heads),
                f"head_dim {head_dim} is not supported: megagpt's head size is hidden_size / "
                f"num_attention_heads = {hidden // heads}",
            )
        max_positions = f.int("max_position_embeddings", d["max_position_embeddings"])
        return {
            "family": self.family,
            "vocab_size": f.int("vocab_size", d["vocab_size"]),
            "max_seq_len": max_positions,
            "n_layer": f.int("num_hidden_layers", d["num_hidden_layers"]),
            "n_head": heads,
            "n_kv_head": f.int("num_key_value_heads", d["num_key_value_heads"], nullable=True),
            "n_embd": hidden,
            "head_dim": head_dim,
            "mlp_hidden": f.int("intermediate_size", d["intermediate_size"]),
            "norm_eps": f.float("rms_norm_eps", d["rms_norm_eps"]),
            "init_std": f.float("initializer_range", 0.02),
            "tie_embeddings": f.flag("tie_word_embeddings", d["tie_word_embeddings"]),
            **_read_rope(f, max_positions),
        }

    def config_from_hf(self, cfg):
        f = _Fields(cfg)
        attention_bias, mlp_bias = f.flag("attention_bias", False), f.flag("mlp_bias", False)
        _refuse_unless(
            attention_bias == mlp_bias,
            f"attention_bias {str(attention_bias).lower()} with mlp_bias {str(mlp_bias).lower()} is not "
            "supported (megagpt has one bias switch for all linear layers)",
        )
        return GPTConfig(**self.read_shape(f), bias=attention_bias)


class MistralAdapter(LlamaAdapter):
    """Llama's tensors and computation; no biases (MistralForCausalLM has
    none, whatever config.json says); a sliding window."""

    family, model_type, architecture, prefix = "mistral", "mistral", "MistralForCausalLM", "model."
    # MistralConfig's defaults (transformers), for keys a config.json leaves out.
    DEFAULTS = {
        **LlamaAdapter.DEFAULTS,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096,
    }

    def config(self, c):
        return {**self.shape_config(c), "sliding_window": c.sliding_window}

    def config_from_hf(self, cfg):
        f = _Fields(cfg)
        shape = self.read_shape(f)
        # Absent is MistralConfig's 4096; null is no window.
        # Any window reads: megagpt computes full causal attention, the same thing
        # for every sequence the window covers; the training sequence length
        # (hf_import, config_checks) and generation (generate.py) are held to it.
        window = f.int("sliding_window", self.DEFAULTS["sliding_window"], nullable=True)
        return GPTConfig(**shape, bias=False, sliding_window=window)


class Qwen2Adapter(LlamaAdapter):
    """Llama's tensors, and biases on q/k/v (Qwen2ForCausalLM always has them,
    and no other bias, whatever config.json says).  Qwen's sliding window is
    off in the published models (use_sliding_window false: transformers then
    ignores sliding_window and max_window_layers); on, it is refused."""

    family, model_type, architecture, prefix = "qwen2", "qwen2", "Qwen2ForCausalLM", "model."
    # Qwen2Config's defaults (transformers), for keys a config.json leaves out.
    DEFAULTS = {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }

    def config(self, c):
        # Full causal attention on every layer: megagpt computes nothing else.
        return {
            **self.shape_config(c),
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": c.n_layer,
        }

    def read_qwen(self, f: _Fields) -> dict:
        """GPTConfig's fields from what Qwen2 and Qwen3 share, checked."""
        _refuse_unless(
            not f.flag("use_sliding_window", False),
            "use_sliding_window true is not supported (megagpt computes full causal attention only)",
        )
        return {**self.read_shape(f), "bias": False}

    def config_from_hf(self, cfg):
        return GPTConfig(**self.read_qwen(_Fields(cfg)))


class Qwen3Adapter(Qwen2Adapter):
    """Llama's tensors, and q_norm / k_norm (an RMSNorm gain of head_dim per
    layer for each); no biases (attention_bias true is refused); config.json's
    head_dim, which need not be hidden_size / num_attention_heads."""

    family, model_type, architecture, prefix = "qwen3", "qwen3", "Qwen3ForCausalLM", "model."
    # Qwen3Config's defaults (transformers), for keys a config.json leaves out.
    DEFAULTS = {**Qwen2Adapter.DEFAULTS, "head_dim": 128}

    def config(self, c):
        return {**super().config(c), "attention_bias": False}

    def config_from_hf(self, cfg):
        f = _Fields(cfg)
        _refuse_unless(
            not f.flag("attention_bias", False), "attention_bias true is not supported (megagpt's qwen3 has no biases)"
        )
        return GPTConfig(**self.read_qwen(f))


ADAPTERS: dict[str, Adapter] = {
    a.family: a for a in (GPT2Adapter(), LlamaAdapter(), MistralAdapter(), Qwen2Adapter(), Qwen3Adapter())
}
BY_MODEL_TYPE: dict[str, Adapter] = {a.model_type: a for a in ADAPTERS.values()}
BY_ARCHITECTURE: dict[str, Adapter] = {a.architecture: a for a in ADAPTERS.values()}


def adapter(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise ValueError(f"family {family!r} has no Hugging Face adapter; megagpt has {tuple(ADAPTERS)}")
    return ADAPTERS[family]


def adapter_for(c: GPTConfig) -> Adapter:
    """The adapter of c's family."""
    return adapter(c.family)
