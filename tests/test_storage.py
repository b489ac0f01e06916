"""transfuse.storage: the one owner of filesystem calls (local paths here; URIs go through the same pyarrow code)."""

from __future__ import annotations

from transfuse import storage


def _tree(root) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / ".ray_train" / "checkpoint_000001").mkdir(parents=True)
    (root / "a" / "b" / "x.json").write_text("{}")
    (root / "top.bin").write_bytes(b"1")


def test_list_dirs_lists_the_folders_directly_under_a_path(tmp_path):
    _tree(tmp_path)
    assert storage.list_dirs(str(tmp_path)) == [".ray_train", "a"]  # dot-folders too, sorted; files not
    assert storage.list_dirs(str(tmp_path / ".ray_train")) == ["checkpoint_000001"]
    assert storage.list_dirs(str(tmp_path / "missing")) == [] == storage.list_dirs(str(tmp_path / "top.bin"))


def test_clear_dir_empties_a_folder_and_keeps_it(tmp_path):
    _tree(tmp_path)
    storage.clear_dir(str(tmp_path))
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []
    storage.clear_dir(str(tmp_path / "missing"))  # nothing to clear is fine


def test_delete_removes_a_file_or_a_folder_and_ignores_what_is_not_there(tmp_path):
    _tree(tmp_path)
    storage.delete(str(tmp_path / "top.bin"))
    storage.delete(str(tmp_path / "a"))
    storage.delete(str(tmp_path / "missing"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ray_train"]
    assert storage.list_files(str(tmp_path)) == []  # dot-folders hold working state, not outputs


def test_skip_complete_only_for_a_complete_manifest_with_the_same_fingerprint(tmp_path, caplog):
    from transfuse.config import load_config

    cfg = load_config(None, [f"storage={tmp_path}"])
    out = str(tmp_path / "stage")
    assert not storage.skip_complete(out, "fp1", "demo")  # nothing written yet
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "out.txt").write_text("x")
    storage.write_manifest(out, cfg, "demo", "fp1")
    with caplog.at_level("INFO", logger="transfuse.storage"):
        assert storage.skip_complete(out, "fp1", "demo")
    assert "demo: " in caplog.text and "fp1" in caplog.text
    assert not storage.skip_complete(out, "fp1", "demo", force=True)  # forced: run again
    assert not storage.skip_complete(out, "fp2", "demo")  # another config: run again


def test_clear_outputs_keeps_working_state_and_removes_the_manifest(tmp_path):
    _tree(tmp_path)
    (tmp_path / storage.MANIFEST).write_text("{}")
    (tmp_path / ".stamp.json").write_text("{}")
    storage.clear_outputs(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ray_train", ".stamp.json", "a"]
    assert storage.list_files(str(tmp_path)) == [] and not (tmp_path / "a" / "b" / "x.json").exists()
    assert (tmp_path / ".ray_train" / "checkpoint_000001").is_dir()
