"""The driver's service rules, asserted on both backends through the Backend interface."""

from __future__ import annotations

import errno

import pytest

from cxi_cni.cxi.backend import (
    MEMBER_UID,
    CxiError,
    Limit,
    Member,
    ServiceDesc,
)

SMALL = {"ptes": 2048, "txqs": 1024, "tgqs": 512, "eqs": 2047, "cts": 2047, "les": 10,
         "tles": 2048, "acs": 1022}


@pytest.fixture
def dev(cxi_setup):
    device = cxi_setup.backend().open("cxi0")
    yield device
    device.close()


def fails(call, err: int, *args):
    with pytest.raises(CxiError) as info:
        call(*args)
    assert info.value.errno == err, str(info.value)
    return info.value


def test_devices_and_master_mapping(cxi_setup):
    backend = cxi_setup.backend()
    backend.check()
    assert backend.device_names() == ["cxi0", "cxi1"]
    assert backend.device_for_netdev("hsn1") == "cxi1"
    fails(backend.open, errno.ENODEV, "cxi7")


def test_binding_sequence(dev):
    sid = dev.alloc_svc(ServiceDesc.for_netns([100, 200], tcs=["low_latency"]))
    assert sid > 1
    assert dev.svc_get_netns(sid) == 0
    dev.svc_enable(sid, False)
    assert dev.get_svc(sid).enable is False
    dev.svc_set_netns(sid, 4026532999)
    dev.svc_enable(sid, True)
    desc = dev.get_svc(sid)
    assert (desc.enable, desc.vnis, desc.tcs) == (True, (100, 200), frozenset({"low_latency"}))
    assert dev.svc_get_netns(sid) == 4026532999
    listed = {s.svc_id: s for s in dev.list_services()}
    assert listed[sid].netns_inode == 4026532999
    dev.destroy_svc(sid)
    fails(dev.get_svc, errno.EINVAL, sid)


def test_lowest_free_id_is_reused(dev):
    ids = [dev.alloc_svc(ServiceDesc.for_netns([10 + i])) for i in range(3)]
    dev.destroy_svc(ids[0])
    assert dev.alloc_svc(ServiceDesc.for_netns([99])) == ids[0]


@pytest.mark.parametrize("desc", [
    ServiceDesc(restricted_vnis=True, vnis=()),
    ServiceDesc(restricted_vnis=True, vnis=(0,)),
    ServiceDesc(resource_limits=True, limits={"les": Limit(5, 6)}),
    ServiceDesc(resource_limits=True, limits={"acs": Limit(5000, 0)}),
], ids=["no VNIs", "VNI 0", "res above max", "max above total"])
def test_invalid_descs_are_refused(dev, desc):
    fails(dev.alloc_svc, errno.EINVAL, desc)


def test_too_many_vnis_are_refused(dev):
    with pytest.raises(CxiError) as info:
        dev.alloc_svc(ServiceDesc.for_netns([2, 3, 4, 5, 6]))
    assert info.value.errno == errno.EINVAL


def test_reservations_beyond_the_device_run_out(cxi_setup):
    cxi_setup.seed({"cxi0": ("hsn0", False, SMALL)})
    dev = cxi_setup.backend().open("cxi0")
    desc = ServiceDesc.for_netns([100], limits={"les": Limit(10, 6)})
    dev.alloc_svc(desc)
    err = fails(dev.alloc_svc, errno.ENOSPC, desc)
    assert "les" in str(err)


def test_destroy_rules(cxi_setup, dev):
    fails(dev.destroy_svc, errno.EINVAL, 1)
    fails(dev.destroy_svc, errno.EINVAL, 777)
    sid = dev.alloc_svc(ServiceDesc.for_netns([100]))
    cxi_setup.set_busy("cxi0", sid, 1)
    fails(dev.destroy_svc, errno.EBUSY, sid)
    cxi_setup.set_busy("cxi0", sid, 0)
    dev.destroy_svc(sid)


def test_set_netns_rules(dev):
    fails(dev.svc_set_netns, errno.EINVAL, 777, 4026532999)
    open_members = ServiceDesc(restricted_vnis=True, vnis=(100,), enable=True)
    fails(dev.svc_set_netns, errno.EEXIST, dev.alloc_svc(open_members), 4026532999)
    with_uid = ServiceDesc(restricted_members=True, restricted_vnis=True, vnis=(100,),
                           members=(Member(1000, MEMBER_UID), Member()), enable=True)
    fails(dev.svc_set_netns, errno.EEXIST, dev.alloc_svc(with_uid), 4026532999)


def test_set_netns_on_a_vf_is_refused(cxi_setup):
    cxi_setup.seed({"cxi0": ("hsn0", True, None)})
    dev = cxi_setup.backend().open("cxi0")
    sid = dev.alloc_svc(ServiceDesc.for_netns([100]))
    fails(dev.svc_set_netns, errno.EPERM, sid, 4026532999)
