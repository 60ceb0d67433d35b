"""OFL-SAM2 adapter files: round trip, refusal of mismatched or damaged adapters, safe saving."""

from __future__ import annotations

import json
import os

import pytest
import torch

import oflsam2
from oflsam2.errors import AdapterError
from oflsam2.ofl import adapter as adapter_module
from oflsam2.ofl.adapter import FORMAT_VERSION, list_adapters, load_adapter, save_adapter
from oflsam2.ofl.fusion import AdaptiveFusion, ChannelLift
from oflsam2.ofl.learner import FewShotLearner

IDENTITY = {
    "model": "sam2.1-tiny",
    "config": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "checkpoint_sha256": "random-weights:0",
    "image_size": 256,
    "preset": "ct-abdomen",
    "axis": 0,
}


def metadata(label=1, name="liver", **changes):
    meta = dict(IDENTITY, label=label, label_name=name)
    meta["training"] = {"epochs": 40, "lr": 1e-3, "lr_milestones": [10, 30], "gamma": 0.8, "num_retrieved": 2,
                        "seed": 0, "support_slices": 12, "support_volumes": 3}
    meta.update(changes)
    return meta


def modules(seed=0):
    torch.manual_seed(seed)
    parts = {"learner": FewShotLearner(8, 4, init_lambda=0.05), "lift": ChannelLift(4, 8), "afm": AdaptiveFusion(8)}
    torch.nn.init.normal_(parts["afm"].gate.weight)
    return parts


def state(parts):
    return {f"{name}.{k}": v for name, module in parts.items() for k, v in module.state_dict().items()}


def files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    parts = modules()
    path = save_adapter(tmp_path, parts, metadata())
    assert path == tmp_path / "liver.safetensors"
    assert files(tmp_path) == ["liver.json", "liver.safetensors"]
    tensors, meta = load_adapter(tmp_path, label="liver", expected=IDENTITY)
    original = state(parts)
    assert tensors.keys() == original.keys()
    for key, value in original.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value)
    for key, value in metadata().items():
        assert meta[key] == value
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["engine_version"] == oflsam2.__version__
    assert meta["learner_kernel_size"] == 3
    assert meta["created"].endswith("+00:00")
    # The same adapter through every way of naming it.
    for where, label in [(path, None), (tmp_path / "liver.json", None), (tmp_path, 1), (tmp_path, None), (tmp_path, "LIVER")]:
        again, again_meta = load_adapter(where, label=label)
        assert again_meta == meta and all(torch.equal(again[k], tensors[k]) for k in tensors)
    rebuilt = modules(seed=1)
    for name, module in rebuilt.items():
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
    assert torch.equal(rebuilt["afm"].gate.weight, parts["afm"].gate.weight)


def test_plain_tensor_dicts_of_any_dtype_round_trip(tmp_path):
    tensors = {
        "head.lift.weight": torch.randn(8, 4, 1, 1),
        "bank.vision": torch.randn(3, 8, 4, 4).to(torch.bfloat16),
        "bank.index": torch.arange(3),
        "bank.view": torch.randn(4, 6)[:, ::2],  # non-contiguous view
    }
    save_adapter(tmp_path / "new" / "dir", tensors, metadata(label=7, name="Left kidney / cortex"))
    loaded, meta = load_adapter(tmp_path / "new" / "dir", label="Left kidney / cortex")
    assert files(tmp_path / "new" / "dir") == ["Left_kidney_cortex.json", "Left_kidney_cortex.safetensors"]
    assert "learner_kernel_size" not in meta
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)


def test_list_adapters_reads_only_adapter_metadata(tmp_path):
    save_adapter(tmp_path, modules(), metadata(label=10, name="spleen"))
    save_adapter(tmp_path, modules(), metadata(label=2, name="liver"))
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    (tmp_path / "broken.json").write_text("{")
    listed = list_adapters(tmp_path)
    assert [(a["label"], a["label_name"]) for a in listed] == [(2, "liver"), (10, "spleen")]
    assert listed[0]["path"] == str(tmp_path / "liver.json")
    with pytest.raises(AdapterError, match="liver, spleen"):
        load_adapter(tmp_path)  # two adapters: which one?
    with pytest.raises(AdapterError, match="No adapter for label 'kidney'.*liver, spleen"):
        load_adapter(tmp_path, label="kidney")
    with pytest.raises(AdapterError, match="does not exist"):
        list_adapters(tmp_path / "absent")


@pytest.mark.parametrize(
    "field, current",
    [
        ("model", "sam2.1-base-plus"),
        ("config", "configs/sam2/sam2_hiera_t.yaml"),
        ("checkpoint_sha256", "0" * 64),
        ("image_size", 1024),
        ("preset", "mri"),
        ("axis", 2),
    ],
)
def test_each_mismatched_field_is_refused_by_name(tmp_path, field, current):
    save_adapter(tmp_path, modules(), metadata())
    expected = dict(IDENTITY, **{field: current})
    with pytest.raises(AdapterError) as refused:
        load_adapter(tmp_path, label="liver", expected=expected)
    message = str(refused.value)
    assert field in message and repr(IDENTITY[field]) in message and repr(current) in message
    assert "train a new adapter" in message
    other_fields = [f for f in IDENTITY if f != field]
    assert not any(f"{f} is" in message for f in other_fields)


def test_fields_absent_from_expected_are_not_checked(tmp_path):
    save_adapter(tmp_path, modules(), metadata())
    load_adapter(tmp_path, label="liver", expected={"model": "sam2.1-tiny"})
    load_adapter(tmp_path, label="liver", expected={})
    load_adapter(tmp_path, label="liver", expected={"learner_kernel_size": 3, "image_size": 256})
    with pytest.raises(AdapterError, match="learner_kernel_size"):
        load_adapter(tmp_path, label="liver", expected={"learner_kernel_size": 1})


def test_other_format_version_is_refused(tmp_path):
    save_adapter(tmp_path, modules(), metadata())
    meta_path = tmp_path / "liver.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=f"format_version is {FORMAT_VERSION + 1}.*reads {FORMAT_VERSION}"):
        load_adapter(tmp_path, label="liver")


def test_damaged_or_incomplete_adapters_are_refused(tmp_path):
    path = save_adapter(tmp_path, modules(), metadata())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="does not match its metadata"):
        load_adapter(path)
    path.unlink()
    with pytest.raises(AdapterError, match="cannot be read"):
        load_adapter(tmp_path / "liver.json")
    path.write_bytes(data)
    load_adapter(path)
    (tmp_path / "liver.json").write_text("{not json")
    with pytest.raises(AdapterError, match="cannot be read"):
        load_adapter(path)
    (tmp_path / "liver.json").unlink()
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(path)
    with pytest.raises(AdapterError, match="No adapter at"):
        load_adapter(tmp_path / "nothing-here")


def test_tensors_of_another_save_do_not_load_with_old_metadata(tmp_path):
    save_adapter(tmp_path / "old", modules(seed=0), metadata())
    new = save_adapter(tmp_path / "new", modules(seed=1), metadata())
    os.replace(new, tmp_path / "old" / "liver.safetensors")  # as if a save died between its two renames
    with pytest.raises(AdapterError, match="does not match its metadata"):
        load_adapter(tmp_path / "old", label="liver")


def test_unwritable_destination_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(AdapterError, match="Cannot write the adapter"):
        save_adapter(blocker / "adapters", modules(), metadata())
    assert files(tmp_path) == ["a-file"]


def test_failure_while_writing_tensors_keeps_the_previous_adapter(tmp_path, monkeypatch):
    old = modules(seed=0)
    save_adapter(tmp_path, old, metadata())

    def dies_half_way(tensors, filename):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("disk unplugged")

    monkeypatch.setattr(adapter_module, "save_file", dies_half_way)
    with pytest.raises(RuntimeError, match="disk unplugged"):
        save_adapter(tmp_path, modules(seed=1), metadata())
    assert files(tmp_path) == ["liver.json", "liver.safetensors"]  # no temporary files left
    tensors, _ = load_adapter(tmp_path, label="liver")
    assert torch.equal(tensors["afm.gate.weight"], old["afm"].gate.weight)


@pytest.mark.parametrize("existing", [False, True])
def test_failure_between_the_renames_leaves_no_loadable_half(tmp_path, monkeypatch, existing):
    if existing:
        save_adapter(tmp_path, modules(seed=0), metadata())
    real_replace = os.replace
    calls = []

    def second_rename_fails(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(adapter_module.os, "replace", second_rename_fails)
    with pytest.raises(AdapterError, match="No space left"):
        save_adapter(tmp_path, modules(seed=1), metadata())
    monkeypatch.undo()
    assert not any(name.endswith(".tmp") for name in files(tmp_path))
    assert "liver.safetensors" not in files(tmp_path)
    with pytest.raises(AdapterError):
        load_adapter(tmp_path, label="liver")


def test_labels_sharing_a_file_name_do_not_overwrite_each_other(tmp_path):
    save_adapter(tmp_path, modules(), metadata(label=1, name="a/b"))
    with pytest.raises(AdapterError, match="belongs to label 'a/b'"):
        save_adapter(tmp_path, modules(), metadata(label=2, name="a_b"))
    replaced = modules(seed=3)
    save_adapter(tmp_path, replaced, metadata(label=5, name="a/b"))  # same name again: replaced
    tensors, meta = load_adapter(tmp_path, label="a/b")
    assert meta["label"] == 5 and torch.equal(tensors["lift.weight"], replaced["lift"].weight)


def test_unnamed_label_is_saved_under_its_id(tmp_path):
    save_adapter(tmp_path, modules(), metadata(label=4, name=""))
    assert files(tmp_path) == ["label_4.json", "label_4.safetensors"]
    assert load_adapter(tmp_path, label=4)[1]["label"] == 4


def test_incomplete_metadata_or_tensors_are_programming_errors(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        save_adapter(tmp_path, modules(), {k: v for k, v in metadata().items() if k != "checkpoint_sha256"})
    with pytest.raises(ValueError, match="not a tensor"):
        save_adapter(tmp_path, {"x": 3}, metadata())
    assert files(tmp_path) == []


@pytest.mark.skipif(not os.path.isfile("/proc/self/maps"), reason="reads this process's file mappings from /proc")
def test_a_loaded_adapter_maps_no_file_so_an_update_can_replace_it(tmp_path, monkeypatch):
    """An ``ofl`` Update on the CPU loads the head it saved and saves over it while the loaded
    tensors live. Windows refuses to replace a file mapped into memory (MoveFileEx fails with
    ERROR_USER_MAPPED_FILE), and safetensors' ``load_file`` keeps the file mapped while its
    tensors live. Here ``os.replace`` follows Windows' rule: it refuses a destination that
    /proc/self/maps shows mapped (before: the Update failed on Windows)."""
    save_adapter(tmp_path, modules(seed=0), metadata())
    tensors, _ = load_adapter(tmp_path, label="liver")
    tensor_file = str(tmp_path / "liver.safetensors")

    def mapped(path) -> bool:
        with open("/proc/self/maps") as maps:
            return any(line.rstrip("\n").endswith(" " + path) for line in maps)

    real_replace = os.replace

    def replace_as_windows_does(source, target):
        if mapped(os.fspath(target)):
            raise PermissionError(13, "The requested operation cannot be performed on a file with a user-mapped section open")
        real_replace(source, target)

    monkeypatch.setattr(adapter_module.os, "replace", replace_as_windows_does)
    assert not mapped(tensor_file), "the loaded adapter keeps its file mapped"
    save_adapter(tmp_path, modules(seed=1), metadata())  # the Update's save, the old tensors still in use
    assert tensors["afm.gate.weight"].sum().isfinite()
    updated, _ = load_adapter(tmp_path, label="liver")
    assert torch.equal(updated["afm.gate.weight"], modules(seed=1)["afm"].gate.weight)
