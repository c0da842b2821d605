"""ARMOR checkpoint format, version 1: the one definition of names, packing, shapes, validation and the
checkpoint folder (docs/FORMAT.md). The pruner (`offline_prune`), the offline reader and the vLLM plugin all
go through this package (``from vllm_armor import checkpoint_format as fmt``; every name below is one of its
modules'); it imports torch and safetensors only.

A pruned linear ``P`` (weight W of shape d_out x d_in) is stored as

    P.core_values  (d_out, d_in // 2)              model dtype   the 2 kept values of each group of 4
    P.core_meta    (d_out, d_in // 8)              uint8         4-bit keep-mask per group, 2 groups a byte
    P.armor_a      (d_out // bs_out, bs_out, bs_out) float       block-diagonal A (optional; model dtype or float32)
    P.armor_b      (d_in // bs_in, bs_in, bs_in)   float       block-diagonal B (optional; as A)
    P.bias         (d_out,)                        model dtype   unchanged (optional)

and computes y = A (core (B x)) + bias. Group g of a row covers inputs 4g..4g+3; its nibble has bit k
set when input 4g+k is kept (exactly two bits set); group 2m is the low nibble of byte m, group 2m+1 the
high nibble. The two kept values are stored in increasing input order. A and B are either both present
or both absent (plain 2:4 checkpoints from the baselines carry neither). Block-diagonal matrices follow
the convention of `vllm_armor.blockdiag`: blocks[J] is the J-th diagonal block.

Modules, one concept each (imports run down this list, never up):

* `names`: version, tensor suffixes, packing constants, file names, `ArmorFormatError`;
* `codec`: 2:4 packing, `encode_linear` / `decode_linear`, `reconstruct_weight`;
* `shapes`: `expected_shapes`, `check_shapes`, `check_dtypes` (from tensors or headers);
* `numerics`: `check_numerics`, `check_outputs` and `ACTIVATION_BOUND`;
* `headers`: one safetensors file's header (`read_header`, `TensorInfo`);
* `atomic`: `atomic_write_text`, `atomic_save_file`;
* `files`: the checkpoint folder (`write_folder`, `read_folder`, `read_headers`, `weight_files`, `config_dtype`);
* `footprint`: `Footprint`, `footprint`;
* `quant_config`: config.json's quantization_config (`make_quant_config`, `validate_quant_config`);
* `validation`: `validate_linear`, `check_checkpoint`, `not_in_model`;
* `index`: `CheckpointIndex`, what both readers know of a checkpoint before loading, and the loaded-tensor checks.
"""

from __future__ import annotations

from vllm_armor.checkpoint_format.atomic import atomic_save_file, atomic_write_text
from vllm_armor.checkpoint_format.codec import (
    DecodedLinear,
    check_packable,
    decode_linear,
    encode_linear,
    linear_tensors,
    mask_is_2of4,
    pack_2to4,
    reconstruct_weight,
    unpack_2to4,
    unpack_mask,
)
from vllm_armor.checkpoint_format.files import (
    config_dtype,
    read_config,
    read_folder,
    read_headers,
    weight_files,
    write_folder,
)
from vllm_armor.checkpoint_format.footprint import Footprint, footprint
from vllm_armor.checkpoint_format.headers import (
    HEADER_LENGTH_BYTES,
    MAX_HEADER_BYTES,
    TensorInfo,
    info_of,
    read_header,
)
from vllm_armor.checkpoint_format.index import CheckpointIndex
from vllm_armor.checkpoint_format.names import (
    ARMOR_A,
    ARMOR_B,
    CONFIG_FILE,
    CORE_META,
    CORE_VALUES,
    FORMAT_VERSION,
    GROUP,
    INDEX_FILE,
    KEEP,
    MAX_SHARD_BYTES,
    META_INPUTS,
    QUANT_METHOD,
    SPARSITY,
    TENSOR_SUFFIXES,
    WEIGHTS_FILE,
    ArmorFormatError,
    tensor_name,
)
from vllm_armor.checkpoint_format.numerics import (
    ACTIVATION_BOUND,
    check_numerics,
    check_outputs,
    reconstruction_bound,
)
from vllm_armor.checkpoint_format.quant_config import (
    QUANT_CONFIG_KEYS,
    is_armor_config,
    make_quant_config,
    validate_quant_config,
)
from vllm_armor.checkpoint_format.shapes import LinearShapes, check_dtypes, check_shapes, expected_shapes
from vllm_armor.checkpoint_format.validation import check_checkpoint, not_in_model, validate_linear

__all__ = [
    "ACTIVATION_BOUND", "ARMOR_A", "ARMOR_B", "CONFIG_FILE", "CORE_META", "CORE_VALUES", "FORMAT_VERSION", "GROUP",
    "HEADER_LENGTH_BYTES", "INDEX_FILE", "KEEP", "MAX_HEADER_BYTES", "MAX_SHARD_BYTES", "META_INPUTS",
    "QUANT_CONFIG_KEYS", "QUANT_METHOD", "SPARSITY", "TENSOR_SUFFIXES", "WEIGHTS_FILE",
    "ArmorFormatError", "CheckpointIndex", "DecodedLinear", "Footprint", "LinearShapes", "TensorInfo",
    "atomic_save_file", "atomic_write_text", "check_checkpoint", "check_dtypes", "check_numerics", "check_outputs",
    "check_packable", "check_shapes", "config_dtype", "decode_linear", "encode_linear", "expected_shapes",
    "footprint", "info_of", "is_armor_config", "linear_tensors", "make_quant_config", "mask_is_2of4",
    "not_in_model", "pack_2to4", "read_config", "read_folder", "read_header", "read_headers", "reconstruct_weight",
    "reconstruction_bound", "tensor_name", "unpack_2to4", "unpack_mask", "validate_linear", "validate_quant_config",
    "weight_files", "write_folder",
]
