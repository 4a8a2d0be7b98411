"""Writing a GGUF copy with a ``RopePlan`` applied: every other key and every tensor's bytes copied unchanged,
in order (the atomic, never-overwriting file handling lives in ``ropekit.hf.export_gguf``).
"""

from __future__ import annotations

from pathlib import Path

from ropekit.gguf.plan import RopePlan


def write_gguf(source: str | Path, plan: RopePlan, out_path: str | Path) -> Path:
    """Write ``source`` with ``plan`` applied to ``out_path`` (the caller makes it atomic; see
    ``ropekit.hf.export_gguf``). Every other key and every tensor's bytes are copied unchanged, in order."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter
    from gguf.constants import GGMLQuantizationType, GGUFValueType, Keys

    reader = GGUFReader(str(source))
    arch_field = reader.get_field(Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field is not None else None
    if not arch:
        raise ValueError("general.architecture: missing from the GGUF metadata")
    writer = GGUFWriter(str(out_path), arch=arch, endianess=reader.endianess)
    writer.data_alignment = reader.alignment
    pending = dict(plan.set_keys)
    for name, fld in reader.fields.items():
        if name == Keys.General.ARCHITECTURE or name.startswith("GGUF.") or name in plan.remove_keys:
            continue
        kind = fld.types[0]
        sub = fld.types[-1] if kind == GGUFValueType.ARRAY else None
        if name in pending:
            value, _ = pending.pop(name)
            if kind == GGUFValueType.STRING or isinstance(value, str):
                kind = GGUFValueType.STRING
            writer.add_key_value(name, value, kind)
            continue
        writer.add_key_value(name, fld.contents(), kind, sub_type=sub)
    for name, (value, kind) in pending.items():
        writer.add_key_value(name, value, GGUFValueType[kind])

    new_tensors = {name: np.asarray(values, dtype=np.float32) for name, values in plan.set_tensors.items()}
    kept = [t for t in reader.tensors if t.name not in plan.remove_tensors and t.name not in new_tensors]
    # convert_hf_to_gguf.py puts the RoPE factor tensors first; llama.cpp finds tensors by name.
    for name, data in new_tensors.items():
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, GGMLQuantizationType.F32)
    for tensor in kept:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in new_tensors.values():
        writer.write_tensor_data(data)
    for tensor in kept:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return Path(out_path)
