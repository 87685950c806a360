"""Concurrency through the frozen binary: rounds of 64 ADDs and DELs run at once over 32
network namespaces (racing on one attachment, two interfaces of one pod, two containers on
one namespace); after every round the records and the simulated devices must agree."""

from __future__ import annotations

import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import reliability

SPACES, OPS_PER_ROUND, ROUNDS = 32, 64, 4


def plan_round(rng: random.Random, spaces: list[str]) -> list[tuple[str, int, str, str]]:
    """64 operations (command, netns index, containerID, ifname): every namespace's pod is
    ADDed or DELeted, some pods get a second interface, some attachments get an ADD and a
    DEL at the same time, and a few namespaces see a second container."""
    ops = [(rng.choice(["ADD", "ADD", "DEL"]), i, f"pod{i}", "eth0") for i in range(len(spaces))]
    while len(ops) < OPS_PER_ROUND:
        i = rng.randrange(len(spaces))
        kind = rng.random()
        if kind < 0.4:
            ops.append((rng.choice(["ADD", "DEL"]), i, f"pod{i}", "net1"))
        elif kind < 0.8:  # the same attachment again: ADD racing DEL, or two ADDs
            ops.append((rng.choice(["ADD", "DEL"]), i, f"pod{i}", "eth0"))
        else:
            ops.append((rng.choice(["ADD", "DEL"]), i, f"other{i}", "eth0"))
    rng.shuffle(ops)
    return ops


def netns_index(container_id: str) -> int:
    """pod7 and other7 both live in namespace 7."""
    return int(container_id.removeprefix("pod").removeprefix("other"))


def vnis_of(container_id: str, ifname: str) -> list[int]:
    """Distinct VNIs per attachment, so a service can be traced to the record that owns it."""
    base = 1000 + netns_index(container_id) * 8
    return [base + (4 if container_id.startswith("other") else 0) + (ifname == "net1")]


def inconsistencies(sim) -> list[str]:
    """Records and devices disagree: a recorded service missing, unbound, disabled or with
    other VNIs; an incomplete record; a service no record claims, or claimed twice."""
    problems = []
    services = {(s.device, s.svc_id): s for s in sim.services()}
    claims = Counter()
    for record in sim.records():
        who = f"{record['containerID']}/{record['ifname']}"
        if not record.get("complete"):
            problems.append(f"record {who} is incomplete")
        for entry in record["services"]:
            key = (entry["device"], entry["svcId"])
            claims[key] += 1
            svc = services.get(key)
            if svc is None:
                problems.append(f"record {who} claims missing service {key}")
            elif svc.netns_inode != record["netnsInode"] or not svc.desc.enable:
                problems.append(f"service {key} of {who} is bound to {svc.netns_inode} "
                                f"(record: {record['netnsInode']}), enabled {svc.desc.enable}")
            elif list(svc.desc.vnis) != record["vnis"]:
                problems.append(f"service {key} of {who} grants {list(svc.desc.vnis)}")
    problems += [f"service {key} claimed by {n} records" for key, n in claims.items() if n > 1]
    problems += [f"service {key} (netns {s.netns_inode}) has no record" for key, s in services.items()
                 if key not in claims]
    return problems


def test_rounds_of_parallel_adds_and_dels_stay_consistent(cni, sim, make_netns):
    spaces = [make_netns() for _ in range(SPACES)]
    inodes = [os.stat(ns).st_ino for ns in spaces]
    rng = random.Random(7)
    touched = set()

    def run(op):
        command, i, cid, ifname = op
        conf = sim.conf(cxi={"vnis": vnis_of(cid, ifname)})
        return op, cni(command, conf, netns=spaces[i], container_id=cid, ifname=ifname)

    with ThreadPoolExecutor(max_workers=OPS_PER_ROUND) as pool:
        for round_no in range(ROUNDS):
            ops = plan_round(rng, spaces)
            touched.update((i, cid, ifname) for _, i, cid, ifname in ops)
            contested = {i for _, i, cid, _ in ops if cid.startswith("other")}
            results = list(pool.map(run, ops))
            failures = []
            for (command, i, cid, ifname), result in results:
                if result.rc == 0:
                    continue
                result.error()  # a clean CNI error at least
                # Only an ADD that met another container on its namespace may lose.
                if command == "DEL" or i not in contested:
                    failures.append(f"{command} {cid}/{ifname}: {result.stdout.strip()}")
            problems = inconsistencies(sim)
            per_op = Counter((i, cid, ifname) for _, i, cid, ifname in ops)
            for (command, i, cid, ifname), _ in results:
                if per_op[(i, cid, ifname)] > 1 or i in contested:
                    continue  # racing operations: either outcome is right
                present = any(r["containerID"] == cid and r["ifname"] == ifname
                              for r in sim.records())
                if present != (command == "ADD"):
                    problems.append(f"{command} {cid}/{ifname} alone, record present: {present}")
            for record in sim.records():
                if record["netnsInode"] != inodes[netns_index(record["containerID"])]:
                    problems.append(f"record {record['containerID']} has a foreign inode")
            reliability.record("concurrency", cases=len(ops), leaks=len(problems), round=round_no)
            assert failures == [], failures
            assert problems == [], f"round {round_no}: {problems}"
        cleanup = [("DEL", i, cid, ifname) for i, cid, ifname in sorted(touched)]
        for _, result in pool.map(run, cleanup):
            result.ok()
    left = reliability.leaks(sim, spaces)
    reliability.record("concurrency", cases=len(cleanup), leaks=len(left), round="final DEL")
    assert left == []
