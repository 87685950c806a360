"""The driver's service rules, asserted on both backends through the Backend interface, on
every stack they emulate (conftest's cxi_setup); and how each stack binds and shows a
service's namespace (cxi/stacks.py), found by cxi.stack "auto"."""

from __future__ import annotations

import errno

import pytest
from conftest import LibcxiSetup, SimSetup, libcxi_setup

from cxi_cni.cxi import stacks
from cxi_cni.cxi.backend import (
    MEMBER_IGNORE,
    MEMBER_NET_NS,
    MEMBER_UID,
    BackendUnavailable,
    CxiError,
    Limit,
    Member,
    ServiceDesc,
    VniInUse,
)

INODE = 4026532999

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


def call_stack_only(dev):
    if not dev.stack.netns_calls:
        pytest.skip(f"{dev.stack.name} has no cxil_svc_set_netns")


def test_auto_finds_the_stack_from_the_library(cxi_setup):
    stack = cxi_setup.backend().stack
    if cxi_setup.stack == "netns-member":
        assert (stack.name, stack.netns_calls) == ("netns-member", False)
        assert stack.chosen_by.endswith("has no cxil_svc_set_netns")
    else:
        assert (stack.name, stack.netns_calls, stack.unique_vnis) == ("netns-call", True, None)
        assert stack.chosen_by.endswith("has cxil_svc_set_netns")


def test_binding_sequence(dev):
    """alloc, bind, enable as the stack does it: bound, enabled, shown in the listing."""
    stack = dev.stack
    sid = stack.alloc(dev, ServiceDesc.for_netns([100, 200], tcs=["low_latency"]), INODE)
    assert sid > 1
    stack.bind(dev, sid, INODE)
    stack.enable(dev, sid)
    desc = dev.get_svc(sid)
    assert (desc.enable, desc.vnis, desc.tcs) == (True, (100, 200), frozenset({"low_latency"}))
    assert stack.netns_of(dev, sid) == INODE
    listed = {s.svc_id: s for s in dev.list_services()}
    assert listed[sid].netns_inode == INODE
    assert listed[1].netns_inode == 0
    dev.destroy_svc(sid)
    fails(dev.get_svc, errno.EINVAL, sid)
    fails(lambda: stack.netns_of(dev, sid), errno.EINVAL)


def test_call_stacks_bind_with_set_netns_and_show_it_only_there(dev):
    call_stack_only(dev)
    sid = dev.alloc_svc(ServiceDesc.for_netns([100]))
    assert dev.get_svc(sid).enable is True  # restricted VNIs: enabled at alloc
    assert dev.svc_get_netns(sid) == 0
    fails(dev.svc_set_netns, errno.EBUSY, sid, INODE)  # enabled
    dev.svc_enable(sid, False)
    dev.svc_set_netns(sid, INODE)
    dev.svc_enable(sid, True)
    assert dev.svc_get_netns(sid) == INODE
    assert all(m.type == MEMBER_IGNORE for m in dev.get_svc(sid).members)


def test_member_stack_binds_at_alloc_and_shows_the_member(dev):
    if dev.stack.netns_calls:
        pytest.skip("the call stacks bind with cxil_svc_set_netns")
    with pytest.raises(BackendUnavailable, match="has no cxil_svc_set_netns .*LIBCXI_1.10"):
        dev.svc_set_netns(2, INODE)
    with pytest.raises(BackendUnavailable, match="has no cxil_svc_get_netns"):
        dev.svc_get_netns(1)
    sid = dev.stack.alloc(dev, ServiceDesc.for_netns([100]), INODE)
    desc = dev.get_svc(sid)
    assert desc.enable and desc.restricted_members
    assert desc.members == (Member(INODE, MEMBER_NET_NS), Member())


def test_a_shared_vni_is_refused_only_by_the_14_0_0_driver(cxi_setup, dev):
    stack = dev.stack
    first = stack.alloc(dev, ServiceDesc.for_netns([300, 301]), INODE)
    if cxi_setup.stack != "shs-14.0.0":
        assert stack.alloc(dev, ServiceDesc.for_netns([301]), INODE + 1) > first
        return
    with pytest.raises(VniInUse) as info:
        stack.alloc(dev, ServiceDesc.for_netns([302, 301]), INODE + 1)
    err = info.value
    assert (err.errno, err.vni, err.holder.svc_id, err.device) == (errno.EEXIST, 301, first, "cxi0")
    assert [s.svc_id for s in dev.list_services()] == [1, first]  # nothing made
    forced = stacks.make("shs-14.0.0", "test")  # refuses before calling the driver
    with pytest.raises(VniInUse):
        forced.alloc(dev, ServiceDesc.for_netns([300]), INODE + 2)


def test_probes_tell_the_stacks_apart_and_leave_nothing(cxi_setup, dev):
    if dev.stack.netns_calls:
        assert stacks.probe_set_netns(dev).answer is True
    shared = stacks.probe_shared_vni(dev)
    assert shared.answer is (cxi_setup.stack != "shs-14.0.0"), shared
    member = stacks.probe_member_netns(dev)
    assert member.answer is True, member
    assert [s.svc_id for s in dev.list_services()] == [1]


def test_lowest_free_id_is_reused(dev):
    ids = [dev.alloc_svc(ServiceDesc.for_netns([20 + i])) for i in range(3)]
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
    dev.alloc_svc(ServiceDesc.for_netns([100], limits={"les": Limit(10, 6)}))
    err = fails(dev.alloc_svc, errno.ENOSPC, ServiceDesc.for_netns([101], limits={"les": Limit(10, 6)}))
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
    call_stack_only(dev)
    fails(dev.svc_set_netns, errno.EINVAL, 777, 4026532999)
    open_members = ServiceDesc(restricted_vnis=True, vnis=(100,), enable=True)
    fails(dev.svc_set_netns, errno.EEXIST, dev.alloc_svc(open_members), 4026532999)
    with_uid = ServiceDesc(restricted_members=True, restricted_vnis=True, vnis=(101,),
                           members=(Member(1000, MEMBER_UID), Member()), enable=True)
    fails(dev.svc_set_netns, errno.EEXIST, dev.alloc_svc(with_uid), 4026532999)


def test_set_netns_on_a_vf_is_refused(cxi_setup):
    cxi_setup.seed({"cxi0": ("hsn0", True, None)})
    dev = cxi_setup.backend().open("cxi0")
    call_stack_only(dev)
    sid = dev.alloc_svc(ServiceDesc.for_netns([100]))
    dev.svc_enable(sid, False)
    fails(dev.svc_set_netns, errno.EPERM, sid, 4026532999)


@pytest.fixture(params=["sim", "libcxi"])
def old_node(request, tmp_path, monkeypatch) -> SimSetup:
    """A node of SHS 13: a library without the netns calls, a driver without NET_NS."""
    if request.param == "sim":
        return SimSetup(tmp_path, "shs-13")
    return libcxi_setup(request, tmp_path, monkeypatch, "shs-13")


def test_a_node_that_can_bind_neither_way_is_told_so(old_node):
    dev = old_node.backend().open("cxi0")
    assert dev.stack.name == "netns-member"  # auto: the library has no set_netns
    fails(dev.alloc_svc, errno.EINVAL, ServiceDesc(restricted_members=True, restricted_vnis=True,
                                                   vnis=(100,), members=(Member(5, MEMBER_NET_NS), Member())))
    with pytest.raises(BackendUnavailable) as info:
        dev.stack.alloc(dev, ServiceDesc.for_netns([100]), INODE)
    assert "refuses a service member of type NET_NS" in str(info.value)
    assert "has no cxil_svc_set_netns" in str(info.value) and "SHS 14.0.1" in str(info.value)
    assert [s.svc_id for s in dev.list_services()] == [1]
    assert stacks.probe_member_netns(dev).answer is False
    assert [s.svc_id for s in dev.list_services()] == [1]


def test_a_forced_call_stack_needs_the_netns_calls(old_node):
    from cxi_cni.cxi.libcxi import LibcxiBackend
    from cxi_cni.cxi.sim import SimBackend

    if isinstance(old_node, LibcxiSetup):
        backend = LibcxiBackend(str(old_node.lib), str(old_node.root / "sys"), stack="shs-14.0.0")
    else:
        backend = SimBackend(str(old_node.sim_state), stack="shs-14.0.0")
    with pytest.raises(BackendUnavailable) as info:
        backend.check()
    assert "has no cxil_svc_set_netns" in str(info.value)
    assert "cxi.stack 'shs-14.0.0' needs" in str(info.value)
