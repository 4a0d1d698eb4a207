"""Finding 9 of issue 19: key files are private from their first moment, never follow a
planted symlink, never silently replace a key; loading a readable secret warns."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from lightning_secagg import cli
from lightning_secagg.errors import ConfigurationError
from lightning_secagg.security import KeyPair, write_key_files


@pytest.fixture
def umask0():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_secret_is_0600_from_creation_even_with_umask_0(tmp_path, umask0, monkeypatch):
    seen = []
    real_open = os.open

    def spy(path, flags, mode_=0o777, *a, **k):
        fd = real_open(path, flags, mode_, *a, **k)
        if str(path).endswith("key_secret") or ".key_secret." in str(path):
            # The file exists now: its mode right after creation, before any write.
            seen.append((flags, stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(os, "open", spy)
    public, secret = write_key_files(tmp_path, "s")
    assert seen and all(m == 0o600 for _, m in seen)
    assert all(f & os.O_EXCL and f & os.O_CREAT and f & os.O_NOFOLLOW for f, _ in seen)
    assert mode(secret) == 0o600 and mode(public) == 0o644
    keys = KeyPair.load(secret)
    assert keys.public in public.read_text()


def test_planted_symlink_is_refused_and_its_target_untouched(tmp_path, umask0):
    target = tmp_path / "victim"
    target.write_text("precious")
    (tmp_path / "s.key_secret").symlink_to(target)
    with pytest.raises(ConfigurationError, match="already exists"):
        write_key_files(tmp_path, "s")
    assert target.read_text() == "precious"
    # A dangling symlink is refused too (O_EXCL), and nothing is created through it.
    (tmp_path / "d.key_secret").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigurationError):
        write_key_files(tmp_path, "d")
    assert not (tmp_path / "nowhere").exists()


def test_overwrite_is_refused_and_force_replaces_atomically(tmp_path, capsys):
    _, secret = write_key_files(tmp_path, "s")
    before = secret.read_bytes()
    assert cli.main(["keygen", "s", "-d", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert secret.read_bytes() == before
    # --force over a symlink replaces the link itself, never writes through it.
    target = tmp_path / "victim"
    target.write_text("precious")
    secret.unlink()
    secret.symlink_to(target)
    assert cli.main(["keygen", "s", "-d", str(tmp_path), "--force"]) == 0
    assert target.read_text() == "precious"
    assert not secret.is_symlink() and mode(secret) == 0o600
    assert KeyPair.load(secret).secret not in before.decode()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_loading_a_secret_others_can_read_warns(tmp_path, caplog):
    _, secret = write_key_files(tmp_path, "s")
    with caplog.at_level(logging.WARNING, logger="lightning_secagg.security"):
        KeyPair.load(secret)
    assert not caplog.records
    os.chmod(secret, 0o644)
    with caplog.at_level(logging.WARNING, logger="lightning_secagg.security"):
        keys = KeyPair.load(secret)
    assert any("644" in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records)
    assert all(keys.secret not in r.getMessage() for r in caplog.records)


def test_name_with_a_path_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="plain file name"):
        write_key_files(tmp_path, "../escape")
