"""The driver's service rules, asserted on both backends through the Backend interface, on
every stack they emulate (conftest's cxi_setup); and how each stack binds and shows a
service's namespace (cxi/stacks.py), found by cxi.stack "auto"."""

from __future__ import annotations

import errno

import pytest
from conftest import LibcxiSetup, SimSetup, libcxi_setup

from cxi_cni.cxi import stacks
from cxi_cni.cxi.backend import (
    ADMIN_CALLS,
    MEMBER_IGNORE,
    MEMBER_NET_NS,
    MEMBER_UID,
    NOT_PERMITTED,
    RESOURCES,
    BackendUnavailable,
    CxiError,
    Limit,
    Member,
    NoResources,
    ServiceDesc,
    VniInUse,
)
from cxi_cni.cxi.shape import NOT_APPLICABLE

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


def test_alloc_enables_a_service_by_its_restricted_vnis_not_its_enable_flag(dev):
    """The driver enables a service with restricted VNIs at once whatever desc.enable says;
    one without restricted VNIs waits, disabled, for a VNI range."""
    restricted = dev.alloc_svc(ServiceDesc(restricted_vnis=True, vnis=(100,), enable=False))
    assert dev.get_svc(restricted).enable is True
    open_vnis = dev.alloc_svc(ServiceDesc(enable=True))
    assert dev.get_svc(open_vnis).enable is False


def test_filtered_listings_agree_with_the_whole_list(dev):
    """services_bound_to and system_services (the simulator answers them from its database,
    libcxi from its whole list) give what filtering the whole listing gives."""
    stack = dev.stack
    for inode, vni in ((INODE, 100), (INODE + 1, 200), (INODE, 300)):
        sid = stack.alloc(dev, ServiceDesc.for_netns([vni]), inode)
        stack.bind(dev, sid, inode)
        stack.enable(dev, sid)
    listed = dev.list_services()
    for inode in (INODE, INODE + 1, INODE + 2):
        assert dev.services_bound_to(inode) == [s for s in listed if s.netns_inode == inode]
    assert len(dev.services_bound_to(INODE)) == 2
    assert [s.svc_id for s in dev.system_services()] == [
        s.svc_id for s in listed if s.desc.is_system_svc]


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


def test_a_vf_refuses_every_admin_call_and_answers_the_rest(cxi_setup):
    """The driver's gate of admin-only calls: on a VF each is -EPERM before the call looks
    at its arguments (service 1 cannot be destroyed, 777 does not exist: EINVAL on a PF);
    listing and reading services stay open."""
    cxi_setup.seed({"cxi0": ("hsn0", True, None)})
    dev = cxi_setup.backend().open("cxi0")
    calls = {"cxil_alloc_svc": lambda: dev.alloc_svc(ServiceDesc.for_netns([100])),
             "cxil_destroy_svc": lambda: dev.destroy_svc(1),
             "cxil_svc_enable": lambda: dev.svc_enable(777, True),
             "cxil_set_svc_lpr": lambda: dev.svc_set_lpr(777, 2)}
    if dev.stack.netns_calls:
        calls["cxil_svc_set_netns"] = lambda: dev.svc_set_netns(777, INODE)
    assert set(calls) | {"cxil_svc_set_netns"} == set(ADMIN_CALLS)
    for op, call in calls.items():
        assert fails(call, errno.EPERM).op == op
    assert [s.svc_id for s in dev.list_services()] == [1]
    assert dev.get_svc(1).vnis == (1, 10) and dev.svc_get_lpr(1) == 1
    assert dev.svc_rsrc_use(1) is not None
    if dev.stack.netns_calls:
        assert dev.svc_get_netns(1) == 0
    probe = stacks.probe_shared_vni(dev)
    assert probe.answer is None and probe.detail.endswith(NOT_PERMITTED), probe


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


# ---------------------------------------------------------------- a service's share of the NIC


def limited(vni: int, **limits: Limit) -> ServiceDesc:
    return ServiceDesc.for_netns([vni], limits=limits)


def test_totals_resource_groups_and_the_default_services_share(cxi_setup, dev):
    assert dev.totals() == dict(zip(RESOURCES, (2048, 1024, 512, 2047, 2047, 16384, 2048, 1022),
                                    strict=True))
    assert dev.rgids_avail() == 255
    default = dev.get_svc(1)
    assert default.resource_limits and default.limits["tles"] == Limit(512, 512)
    assert default.limits["les"] == Limit(16384, 0) and not default.enable
    cxi_setup.seed({"cxi0": ("hsn0", False, SMALL)}, rgids_avail=7)
    small = cxi_setup.backend().open("cxi0")
    assert (small.totals()["les"], small.rgids_avail()) == (10, 7)


def test_the_driver_keeps_tles_as_a_pool_of_at_least_eight(dev):
    """TLEs limited at all are reserved as their max, at least 8; a service without limits
    gets the driver's (the device's totals, 8 TLEs); LNIs per group start at 1."""
    sid = dev.alloc_svc(limited(100, tles=Limit(100, 3), acs=Limit(4, 1)))
    assert dev.get_svc(sid).limits == {"tles": Limit(8, 8), "acs": Limit(4, 1)}
    assert dev.svc_get_lpr(sid) == 1


def test_tle_pools_run_out_after_three_services(dev):
    """4 TLE pools, the default service's one of them: services reserving TLEs, or without
    limits, take the other 3; a service limiting TLEs to nothing takes none."""
    dev.alloc_svc(limited(100, tles=Limit(8, 8)))
    dev.alloc_svc(ServiceDesc.for_netns([101]))  # no limits: the driver's, 8 TLEs
    dev.alloc_svc(limited(102, tles=Limit(16, 16)))
    with pytest.raises(NoResources) as info:
        dev.alloc_svc(limited(103, tles=Limit(8, 8)))
    assert (info.value.no_tle_pools, info.value.no_le_pools, info.value.short) == (True, False, None)
    assert info.value.detail == "no TLE pool left"
    assert dev.alloc_svc(limited(104, txqs=Limit(4, 0))) > 1


def test_le_pools_go_to_services_reserving_les_or_before_14_0_1_limiting_them(cxi_setup, dev):
    """15 LE pools for services. SHS 14.0.1 gives one only to a service reserving LEs; older
    drivers to every service that limits LEs at all."""
    for n in range(15):
        dev.alloc_svc(limited(100 + n, les=Limit(64, 1)))
    with pytest.raises(NoResources) as info:
        dev.alloc_svc(limited(200, les=Limit(64, 1)))
    assert info.value.no_le_pools and info.value.detail == "no LE pool left"
    unreserved = limited(201, les=Limit(64, 0))
    if cxi_setup.stack == "shs-14.0.1":
        assert dev.alloc_svc(unreserved) > 1
    else:
        with pytest.raises(NoResources):
            dev.alloc_svc(unreserved)


def test_fail_info_names_the_first_reservation_short_and_no_tles(cxi_setup, dev):
    """The driver checks reservations in order (PTE, TXQ, TGQ, EQ, CT, LE, AC; never TLE) and
    stops at the first one short: what comes after it is not counted."""
    dev.alloc_svc(limited(100, ptes=Limit(2048, 2000), acs=Limit(1022, 1000)))
    with pytest.raises(NoResources) as info:
        dev.alloc_svc(limited(101, ptes=Limit(2048, 100), acs=Limit(1022, 100)))
    err = info.value
    assert (err.short, err.avail["ptes"], err.avail["acs"]) == ("ptes", 48, 0)
    assert err.detail == "ptes: reserves 100, 48 free"
    with pytest.raises(NoResources) as info:  # the default service holds 512 of 2048 TLEs
        dev.alloc_svc(limited(102, tles=Limit(1600, 1600)))
    assert info.value.short is None and not info.value.no_tle_pools
    assert info.value.detail == ("the driver names nothing short (it does not report TLEs; "
                                 "this service reserves 1600)")


def test_resource_use_of_a_service(cxi_setup, dev):
    """cxil_get_svc_rsrc_use: what the service's processes use; LEs and TLEs only where it has
    a pool of its own (0xFFFF: not applicable), or for the default service."""
    sid = dev.alloc_svc(limited(100, txqs=Limit(10, 2), les=Limit(100, 10)))
    cxi_setup.set_in_use("cxi0", sid, {"txqs": 3, "les": 7, "tles": 5})
    assert dev.svc_rsrc_use(sid) == {**dict.fromkeys(RESOURCES, 0), "txqs": 3, "les": 7,
                                     "tles": NOT_APPLICABLE}
    cxi_setup.set_in_use("cxi0", 1, {"tles": 12})
    assert dev.svc_rsrc_use(1)["tles"] == 12
    fails(dev.svc_rsrc_use, errno.EINVAL, 777)


def test_lnis_per_rgid_rules(cxi_setup, dev):
    """cxil_set_svc_lpr: at most 8 LNIs per group, refused while an LNI uses the service."""
    sid = dev.alloc_svc(limited(100, txqs=Limit(10, 2)))
    dev.svc_set_lpr(sid, 4)
    assert dev.svc_get_lpr(sid) == 4
    fails(dev.svc_set_lpr, errno.EINVAL, sid, 9)
    fails(dev.svc_set_lpr, errno.EINVAL, 777, 2)
    cxi_setup.set_busy("cxi0", sid, 1)
    fails(dev.svc_set_lpr, errno.EBUSY, sid, 2)
    assert dev.svc_get_lpr(sid) == 4
