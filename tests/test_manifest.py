"""A checkpoint's manifest (t2i_train/manifest.py): every file's size and checksum, so that damage in place is
found before a resume trains on it."""

import json

import pytest

from t2i_train import manifest


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "t2iadapter").mkdir()
    (tmp_path / "t2iadapter" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 400)
    (tmp_path / "optimizer.bin").write_bytes(b"\x01" * 5000)
    (tmp_path / "data_state.json").write_text('{"seed": 0}')
    written = manifest.write_manifest(tmp_path)
    assert set(written["files"]) == {"t2iadapter/diffusion_pytorch_model.safetensors", "optimizer.bin",
                                     "data_state.json"}
    return tmp_path


def test_an_untouched_folder_verifies(folder):
    assert manifest.manifest_problems(folder) == []
    (folder / "written_later.txt").write_text("not listed")  # not the manifest's business
    assert manifest.manifest_problems(folder) == []


def test_inverted_bytes_of_the_same_size_are_found_naming_the_file(folder):
    path = folder / "t2iadapter" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[5000:5064] = bytes(255 - byte for byte in data[5000:5064])
    path.write_bytes(bytes(data))
    problems = manifest.manifest_problems(folder)
    assert len(problems) == 1
    assert problems[0].startswith("t2iadapter/diffusion_pytorch_model.safetensors: its checksum differs")


def test_a_truncated_or_missing_file_is_found(folder):
    (folder / "optimizer.bin").write_bytes(b"\x01" * 4000)
    (folder / "data_state.json").unlink()
    assert sorted(manifest.manifest_problems(folder)) == [
        "data_state.json is missing (the manifest lists it)",
        "optimizer.bin has 4000 bytes, the manifest says 5000",
    ]


def test_no_manifest_is_nothing_to_verify_and_a_broken_one_is_a_problem(folder):
    (folder / manifest.MANIFEST_FILE).unlink()
    assert manifest.manifest_problems(folder) == []  # a checkpoint of an earlier version
    for text in ('{"files": {"optimizer.bin": {"size": 5000}}', json.dumps({"algorithm": "sha256", "files": []}),
                 json.dumps({"algorithm": "no-such-hash", "files": {}})):
        (folder / manifest.MANIFEST_FILE).write_text(text)
        problems = manifest.manifest_problems(folder)
        assert len(problems) == 1 and problems[0].startswith(f"{manifest.MANIFEST_FILE} is unreadable"), text
