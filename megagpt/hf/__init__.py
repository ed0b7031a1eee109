"""The Hugging Face adapters: megagpt's GPT <-> transformers' model folders.

One adapter per family, registered in ADAPTERS (keyed by family name) with
its transformers class:

  gpt2     <-> GPT2LMHeadModel    (Conv1D weights are stored transposed: (in, out))
  llama    <-> LlamaForCausalLM   (q/k/v and gate/up are separate there, fused here;
                                   rope_scaling llama3 supported)
  mistral  <-> MistralForCausalLM (llama's tensors; any sliding window, the
                                   sequences megagpt computes must fit in it)
  qwen2    <-> Qwen2ForCausalLM   (llama's tensors and q/k/v biases; no sliding window)
  qwen3    <-> Qwen3ForCausalLM   (llama's tensors and q_norm / k_norm; its own head_dim)

The mapping of tensors is one table per adapter, `sources(c)`: for each
megagpt parameter, the transformers tensors it is made of and how (copied,
transposed, concatenated), with the inverse for export.  Import (`from_hf`,
`load_hf_state`) and export (`to_hf`) both read it, and it touches no tensor
data, so a large model can be loaded one module at a time from memory-mapped
safetensors.

Reading a config.json made elsewhere goes through one entry point,
`read_hf_config(folder)` (or `parse_hf_config(dict)`): every field that
matters to the computation is read, with transformers' default where the key
is absent, and whatever megagpt cannot compute exactly is refused with
HFConfigError, one line naming the file, its `architectures` and the problem.

Pure tensor renaming and reshaping, no transformers import: export writes
files, generation reads them.  The mapping is exact, so logits agree to
float rounding (tests/test_export.py and tests/test_hf_architectures.py check
it against transformers itself).

The package: `mapping` (Source), `fields` (reading config.json fields, the
refusals), `adapters` (one per family), `tensors` (state dicts both ways,
lazy reading), `configs` (config.json both ways, read_hf_config,
load_hf_folder).  Everything public is importable from `megagpt.hf`.
"""

from megagpt.hf.adapters import (
    ADAPTERS,
    BY_ARCHITECTURE,
    BY_MODEL_TYPE,
    Adapter,
    GPT2Adapter,
    LlamaAdapter,
    MistralAdapter,
    adapter,
    adapter_for,
)
from megagpt.hf.configs import config_from_hf, hf_config, load_hf_folder, parse_hf_config, read_hf_config
from megagpt.hf.fields import HFConfigError
from megagpt.hf.mapping import Source, copied, fused, transposed
from megagpt.hf.tensors import Tensors, from_hf, load_hf_state, sources, stored_tensors, to_hf

__all__ = [
    "ADAPTERS",
    "BY_ARCHITECTURE",
    "BY_MODEL_TYPE",
    "Adapter",
    "GPT2Adapter",
    "HFConfigError",
    "LlamaAdapter",
    "MistralAdapter",
    "Source",
    "Tensors",
    "adapter",
    "adapter_for",
    "config_from_hf",
    "copied",
    "from_hf",
    "fused",
    "hf_config",
    "load_hf_folder",
    "load_hf_state",
    "parse_hf_config",
    "read_hf_config",
    "sources",
    "stored_tensors",
    "to_hf",
    "transposed",
]
