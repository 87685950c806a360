"""The frozen binary with an old libcxi that lacks cxil_svc_set_netns: STATUS, ADD and
doctor all name the missing symbol and the library file, and nothing is made."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import LibcxiSetup


@pytest.fixture
def old_lib(tmp_path_factory):
    from libcxi_standin import standin

    return standin.build(tmp_path_factory.mktemp("oldlib"), with_netns=False)


def test_missing_set_netns_is_named_everywhere(cxi_bin, cni, tmp_path, netns, old_lib, monkeypatch):
    setup = LibcxiSetup(tmp_path, old_lib, monkeypatch)
    conf = setup.conf("1.1.0")
    env = setup.env
    for command, code in (("STATUS", 50), ("ADD", 101)):
        err = cni(command, conf, netns=netns, env=env).error(code)
        assert "cxil_svc_set_netns" in err["msg"] and str(old_lib) in err["msg"], err
    assert setup.records() == []
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(conf))
    doctor = subprocess.run([cxi_bin, "doctor", "--config", str(path)], capture_output=True,
                            text=True, env={**os.environ, **env})
    assert doctor.returncode == 1
    assert "cxil_svc_set_netns" in doctor.stdout and str(old_lib) in doctor.stdout
