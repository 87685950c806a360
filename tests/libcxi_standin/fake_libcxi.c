/*
 * A stand-in for libcxi.so.1 used by the tests: the same service functions with the
 * same signatures, acting on simulated devices kept in a text file so that state
 * survives from one plugin process to the next.
 *
 * The struct layouts below are written from the documented ABI facts (x86-64):
 * struct cxi_svc_desc is 68 bytes, alignment 4. The service rules follow the driver:
 * VNI checks, res <= max <= device total, member types, -EINVAL/-EBUSY/-EEXIST/-EPERM.
 * The calls the driver keeps to CAP_SYS_ADMIN on a physical function (alloc, destroy,
 * enable, set_vni_range, set_netns, set_lpr) are -EPERM on a device declared a VF.
 *
 * Resources follow the driver's reserve_rsrcs (cass_svc.c) and rgroup pools
 * (cass_rgroup.c): a service without resource limits gets the device totals as limits; a
 * service other than the default one limiting TLEs at all reserves max = res >= 8 TLEs
 * and takes one of 4 TLE pools (the default service holds one); a service reserving LEs
 * (before 14.0.1: limiting them at all) takes one of the 15 LE pools beside the shared
 * pool 0. Reservations are checked in order, TLEs aside, stopping at the first short one;
 * fail_info says what the driver says. The limits kept are the ones the driver keeps.
 *
 * State file: path in $FAKE_LIBCXI_STATE, locked with flock() for each call. Lines:
 *   driver <stack>
 *   dev <dev_id> <is_vf> <8 comma-separated resource totals>
 *   svc <dev_id> <svc_id> <busy> <netns_inode> <vni_min> <vni_max> <lpr> <8 comma-separated
 *       in_use counts> <136 hex digits>
 * busy > 0 means an LNI still uses the service (tests set it to provoke -EBUSY); lpr is
 * its LNIs per resource group, in_use what its processes use (tests set it); the hex
 * digits are the 68 raw bytes of the stored struct cxi_svc_desc. A device is added
 * with a default service 1 the first time it is opened. Like the driver, a new service
 * gets the lowest free id, so ids of destroyed services are reused.
 *
 * The driver line says which driver the library talks to (default shs-14.0.1):
 *   shs-14.0.1    SVC_SET_NETNS / SVC_GET_NETNS; VNIs may be shared between services
 *   shs-14.0.0    the same, but alloc is -EEXIST when another service holds one of the VNIs
 *   netns-member  the research patches: member type NET_NS at alloc, no netns ops
 *   shs-13        neither: member types up to GID, no netns ops
 * A driver without the netns ops answers them -EINVAL, as for an unknown op. Every driver
 * but shs-14.0.1 gives an LE pool to each service that limits LEs (le_pool_per_service).
 *
 * With $FAKE_LIBCXI_DEV_DIR set, cxil_open_device opens <dir>/cxiN read-write first and
 * fails with its errno, as libcxi fails when /dev/cxiN is missing or not permitted.
 *
 * Build with -DNO_NETNS to leave out cxil_svc_set_netns and cxil_svc_get_netns, as in
 * a libcxi older than 1.10.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#define MAX_VNIS 4
#define NUM_TCS 5
#define NUM_MEMBERS 2
#define NUM_RSRCS 8
#define MAX_DEVS 64
#define MAX_SVCS 1024
#define DEFAULT_SVC_ID 1
#define DESC_HEX_LEN (2 * 68)
#define LE_POOLS 16	  /* per NIC; pool 0 is shared, never a service's own */
#define TLE_POOLS 4	  /* per NIC; the default service holds one */
#define TLE_MIN 8	  /* CASS_MIN_POOL_TLES */
#define MAX_LPR 8	  /* C_NUM_LACS */
#define NOT_APPLICABLE 0xFFFF
#define EXPORT __attribute__((visibility("default")))

enum member_type { MEMBER_IGNORE, MEMBER_UID, MEMBER_GID, MEMBER_NET_NS, MEMBER_MAX };
enum rsrc { R_PTE, R_TXQ, R_TGQ, R_EQ, R_CT, R_LE, R_TLE, R_AC };

enum {
	F_RESTRICTED_MEMBERS = 1 << 0,
	F_RESTRICTED_VNIS = 1 << 1,
	F_RESTRICTED_TCS = 1 << 2,
	F_RESOURCE_LIMITS = 1 << 3,
	F_ENABLE = 1 << 4,
	F_IS_SYSTEM_SVC = 1 << 5,
};

struct svc_member {
	uint32_t id;
	int32_t type;
};

struct rsrc_limit {
	uint16_t max;
	uint16_t res;
};

struct cxi_svc_desc {
	uint8_t flags; /* bits 0-5 as F_*, bits 6-7 cntr_pool_id */
	uint8_t num_vld_vnis;
	uint16_t vnis[MAX_VNIS];
	bool tcs[NUM_TCS];
	struct svc_member members[NUM_MEMBERS];
	struct rsrc_limit limits[NUM_RSRCS];
	uint32_t svc_id;
};

struct cxi_svc_fail_info {
	uint16_t rsrc_avail[NUM_RSRCS];
	bool no_le_pools;
	bool no_tle_pools;
	bool no_cntr_pools;
};

struct cxil_svc_list {
	uint32_t count;
	struct cxi_svc_desc descs[];
};

struct cxi_rsrc_use {
	unsigned int svc_id;
	unsigned int tle_pool_id;
	uint16_t in_use[NUM_RSRCS];
};

/* Only the two stable fields of struct cxil_devinfo are modelled. */
struct cxil_dev {
	uint32_t dev_id;
	uint8_t unmodelled[24];
	char device_name[14];
	uint8_t rest_of_devinfo[256];
};

_Static_assert(sizeof(struct cxi_svc_desc) == 68, "cxi_svc_desc size");
_Static_assert(_Alignof(struct cxi_svc_desc) == 4, "cxi_svc_desc alignment");
_Static_assert(offsetof(struct cxi_svc_desc, num_vld_vnis) == 1, "num_vld_vnis");
_Static_assert(offsetof(struct cxi_svc_desc, vnis) == 2, "vnis");
_Static_assert(offsetof(struct cxi_svc_desc, tcs) == 10, "tcs");
_Static_assert(offsetof(struct cxi_svc_desc, members) == 16, "members");
_Static_assert(sizeof(struct svc_member) == 8, "member size");
_Static_assert(offsetof(struct cxi_svc_desc, limits) == 32, "limits");
_Static_assert(offsetof(struct cxi_svc_desc, svc_id) == 64, "svc_id");
_Static_assert(sizeof(struct cxi_svc_fail_info) == 20, "cxi_svc_fail_info size");
_Static_assert(sizeof(struct cxi_rsrc_use) == 24, "cxi_rsrc_use size");
_Static_assert(offsetof(struct cxi_rsrc_use, in_use) == 8, "cxi_rsrc_use in_use");
_Static_assert(offsetof(struct cxil_svc_list, descs) == 4, "svc list descs");
_Static_assert(offsetof(struct cxil_dev, device_name) == 28, "device_name");

static const uint16_t default_totals[NUM_RSRCS] = {2048, 1024, 512, 2047, 2047, 16384, 2048, 1022};
static const uint16_t default_svc_tles = 512;

struct fake_dev {
	unsigned int dev_id;
	unsigned int is_vf;
	uint16_t totals[NUM_RSRCS];
};

struct fake_svc {
	unsigned int dev_id;
	unsigned int busy;
	unsigned int netns;
	unsigned int vni_min, vni_max;
	unsigned int lpr;
	uint16_t in_use[NUM_RSRCS];
	struct cxi_svc_desc desc;
};

struct driver {
	char name[32];
	bool netns_ops;		  /* SVC_SET_NETNS and SVC_GET_NETNS exist */
	bool unique_vnis;	  /* a VNI belongs to one service per device */
	int member_max;		  /* member types below this are accepted */
	bool le_pool_per_service; /* any LE limit takes an LE pool (before 14.0.1) */
};

static const struct driver drivers[] = {
	{"shs-14.0.1", true, false, MEMBER_MAX, false},
	{"shs-14.0.0", true, true, MEMBER_MAX, true},
	{"netns-member", false, false, MEMBER_MAX, true},
	{"shs-13", false, false, MEMBER_NET_NS, true},
};

struct state {
	int fd;
	struct driver driver;
	int ndevs, nsvcs;
	struct fake_dev devs[MAX_DEVS];
	struct fake_svc svcs[MAX_SVCS];
};

static void complain(const char *what)
{
	fprintf(stderr, "fake libcxi: %s\n", what);
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

static int parse_line(struct state *st, char *line)
{
	struct fake_dev d;
	struct fake_svc s;
	char hex[DESC_HEX_LEN + 2];
	unsigned int svc_id;
	uint8_t *bytes = (uint8_t *)&s.desc;

	char name[32];

	if (line[0] == '#' || line[0] == '\n' || line[0] == '\0')
		return 0;
	if (sscanf(line, "driver %31s", name) == 1) {
		for (size_t i = 0; i < sizeof(drivers) / sizeof(drivers[0]); i++) {
			if (!strcmp(drivers[i].name, name)) {
				st->driver = drivers[i];
				return 0;
			}
		}
		return -EIO;
	}
	if (sscanf(line, "dev %u %u %hu,%hu,%hu,%hu,%hu,%hu,%hu,%hu", &d.dev_id, &d.is_vf,
		   &d.totals[0], &d.totals[1], &d.totals[2], &d.totals[3], &d.totals[4],
		   &d.totals[5], &d.totals[6], &d.totals[7]) == 10) {
		if (st->ndevs == MAX_DEVS)
			return -ENOSPC;
		st->devs[st->ndevs++] = d;
		return 0;
	}
	if (sscanf(line, "svc %u %u %u %u %u %u %u %hu,%hu,%hu,%hu,%hu,%hu,%hu,%hu %137s",
		   &s.dev_id, &svc_id, &s.busy, &s.netns, &s.vni_min, &s.vni_max, &s.lpr,
		   &s.in_use[0], &s.in_use[1], &s.in_use[2], &s.in_use[3], &s.in_use[4],
		   &s.in_use[5], &s.in_use[6], &s.in_use[7], hex) == 16 &&
	    strlen(hex) == DESC_HEX_LEN) {
		for (int i = 0; i < (int)sizeof(s.desc); i++) {
			int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);

			if (hi < 0 || lo < 0)
				return -EIO;
			bytes[i] = (uint8_t)(hi << 4 | lo);
		}
		if (s.desc.svc_id != svc_id)
			return -EIO;
		if (st->nsvcs == MAX_SVCS)
			return -ENOSPC;
		st->svcs[st->nsvcs++] = s;
		return 0;
	}
	return -EIO;
}

/* Open and lock the state file, then read it. Returns 0 or a negative errno. */
static int state_load(struct state *st)
{
	const char *path = getenv("FAKE_LIBCXI_STATE");
	char line[512];
	FILE *f;
	int rc = 0;

	st->ndevs = st->nsvcs = 0;
	st->driver = drivers[0];
	if (!path || !*path) {
		complain("FAKE_LIBCXI_STATE is not set");
		return -ENODEV;
	}
	st->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (st->fd < 0)
		return -errno;
	if (flock(st->fd, LOCK_EX) < 0) {
		rc = -errno;
		close(st->fd);
		return rc;
	}
	f = fdopen(dup(st->fd), "r");
	if (!f) {
		rc = -errno;
		close(st->fd);
		return rc;
	}
	while (!rc && fgets(line, sizeof(line), f))
		rc = parse_line(st, line);
	fclose(f);
	if (rc) {
		complain("state file is corrupt");
		close(st->fd);
	}
	return rc;
}

static int state_save(struct state *st)
{
	FILE *f;
	int rc = 0;

	if (ftruncate(st->fd, 0) < 0 || lseek(st->fd, 0, SEEK_SET) < 0)
		return -errno;
	f = fdopen(dup(st->fd), "w");
	if (!f)
		return -errno;
	fprintf(f, "driver %s\n", st->driver.name);
	for (int i = 0; i < st->ndevs; i++) {
		struct fake_dev *d = &st->devs[i];

		fprintf(f, "dev %u %u", d->dev_id, d->is_vf);
		for (int r = 0; r < NUM_RSRCS; r++)
			fprintf(f, "%c%hu", r ? ',' : ' ', d->totals[r]);
		fputc('\n', f);
	}
	for (int i = 0; i < st->nsvcs; i++) {
		struct fake_svc *s = &st->svcs[i];
		const uint8_t *bytes = (const uint8_t *)&s->desc;

		fprintf(f, "svc %u %u %u %u %u %u %u", s->dev_id, s->desc.svc_id, s->busy,
			s->netns, s->vni_min, s->vni_max, s->lpr);
		for (int r = 0; r < NUM_RSRCS; r++)
			fprintf(f, "%c%hu", r ? ',' : ' ', s->in_use[r]);
		fputc(' ', f);
		for (int b = 0; b < (int)sizeof(s->desc); b++)
			fprintf(f, "%02x", bytes[b]);
		fputc('\n', f);
	}
	if (fflush(f) != 0 || fsync(fileno(f)) != 0)
		rc = -errno;
	fclose(f);
	return rc;
}

/* Release the lock; with save, write the state back first. */
static int state_done(struct state *st, bool save, int rc)
{
	if (save && rc >= 0) {
		int save_rc = state_save(st);

		if (save_rc < 0)
			rc = save_rc;
	}
	close(st->fd);
	return rc;
}

static struct fake_dev *find_dev(struct state *st, unsigned int dev_id)
{
	for (int i = 0; i < st->ndevs; i++)
		if (st->devs[i].dev_id == dev_id)
			return &st->devs[i];
	return NULL;
}

static struct fake_svc *find_svc(struct state *st, unsigned int dev_id, unsigned int svc_id)
{
	for (int i = 0; i < st->nsvcs; i++)
		if (st->svcs[i].dev_id == dev_id && st->svcs[i].desc.svc_id == svc_id)
			return &st->svcs[i];
	return NULL;
}

static struct fake_dev *add_device(struct state *st, unsigned int dev_id)
{
	struct fake_dev *d = &st->devs[st->ndevs++];

	memset(d, 0, sizeof(*d));
	d->dev_id = dev_id;
	memcpy(d->totals, default_totals, sizeof(d->totals));
	return d;
}

static void add_default_service(struct state *st, const struct fake_dev *d)
{
	struct fake_svc *s = &st->svcs[st->nsvcs++];
	unsigned int dev_id = d->dev_id;

	/* Like the driver's default service: restricted VNIs 1 and 10, TCs 0-3, left
	 * disabled, reserving TLEs. */
	memset(s, 0, sizeof(*s));
	s->dev_id = dev_id;
	s->lpr = 1;
	s->desc.svc_id = DEFAULT_SVC_ID;
	s->desc.flags = F_RESTRICTED_VNIS | F_RESOURCE_LIMITS;
	s->desc.num_vld_vnis = 2;
	s->desc.vnis[0] = 1;
	s->desc.vnis[1] = 10;
	for (int tc = 0; tc < 4; tc++)
		s->desc.tcs[tc] = true;
	for (int r = 0; r < NUM_RSRCS; r++)
		s->desc.limits[r].max = d->totals[r];
	s->desc.limits[R_TLE].max = s->desc.limits[R_TLE].res = default_svc_tles;
}

/* The driver's gate of admin-only calls, checked before the call itself: CAP_SYS_ADMIN (the
 * tests run as root) on a physical function; the call is -EPERM otherwise. */
static bool admin_permitted(const struct fake_dev *d)
{
	return !d->is_vf;
}

/* Load the state and find the device of an open handle. */
static int begin(struct state *st, const struct cxil_dev *dev, struct fake_dev **fd)
{
	int rc;

	if (!dev)
		return -EINVAL;
	rc = state_load(st);
	if (rc)
		return rc;
	*fd = find_dev(st, dev->dev_id);
	if (!*fd) {
		close(st->fd);
		return -ENODEV;
	}
	return 0;
}

/* Like libcxi's open of /dev/cxiN, under $FAKE_LIBCXI_DEV_DIR when that is set. */
static int open_device_file(uint32_t dev_id)
{
	const char *dir = getenv("FAKE_LIBCXI_DEV_DIR");
	char path[4096];
	int fd;

	if (!dir || !*dir)
		return 0;
	snprintf(path, sizeof(path), "%s/cxi%u", dir, dev_id);
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	close(fd);
	return 0;
}

EXPORT int cxil_open_device(uint32_t dev_id, struct cxil_dev **dev)
{
	struct state *st;
	struct cxil_dev *out;
	int rc;

	if (!dev || dev_id >= MAX_DEVS)
		return -EINVAL;
	rc = open_device_file(dev_id);
	if (rc)
		return rc;
	st = calloc(1, sizeof(*st));
	out = calloc(1, sizeof(*out));
	if (!st || !out) {
		free(st);
		free(out);
		return -ENOMEM;
	}
	rc = state_load(st);
	if (!rc) {
		/* A device appears at its first open (or was declared by a dev line), and
		 * has its default service from then on. */
		struct fake_dev *d = find_dev(st, dev_id);
		bool added = false;

		if (!d && st->ndevs < MAX_DEVS)
			d = add_device(st, dev_id);
		if (!d || (!find_svc(st, dev_id, DEFAULT_SVC_ID) && st->nsvcs == MAX_SVCS)) {
			rc = -ENOSPC;
		} else if (!find_svc(st, dev_id, DEFAULT_SVC_ID)) {
			add_default_service(st, d);
			added = true;
		}
		rc = state_done(st, added, rc);
	}
	free(st);
	if (rc < 0) {
		free(out);
		return rc;
	}
	out->dev_id = dev_id;
	snprintf(out->device_name, sizeof(out->device_name), "cxi%u", dev_id);
	*dev = out;
	return 0;
}

EXPORT void cxil_close_device(struct cxil_dev *dev)
{
	free(dev);
}

/* Byte checks beyond the driver's own: catch a caller whose layout is off. */
static int check_bytes(const struct cxi_svc_desc *desc)
{
	const uint8_t *bytes = (const uint8_t *)desc;

	if (bytes[offsetof(struct cxi_svc_desc, tcs) + NUM_TCS] != 0) {
		complain("padding byte 15 of cxi_svc_desc is not zero: layout mismatch?");
		return -EINVAL;
	}
	for (int i = 0; i < NUM_TCS; i++) {
		if (bytes[offsetof(struct cxi_svc_desc, tcs) + i] > 1) {
			complain("a tcs[] byte is neither 0 nor 1: layout mismatch?");
			return -EINVAL;
		}
	}
	return 0;
}

static int validate_desc(const struct state *st, const struct cxi_svc_desc *desc,
			 const struct fake_dev *d)
{
	if (desc->flags & F_RESTRICTED_VNIS) {
		if (desc->num_vld_vnis < 1 || desc->num_vld_vnis > MAX_VNIS)
			return -EINVAL;
		for (int i = 0; i < desc->num_vld_vnis; i++)
			if (desc->vnis[i] < 1) /* uint16: 65535 is the upper bound */
				return -EINVAL;
	}
	if (desc->flags & F_RESTRICTED_MEMBERS) {
		for (int i = 0; i < NUM_MEMBERS; i++)
			if (desc->members[i].type < 0 || desc->members[i].type >= st->driver.member_max)
				return -EINVAL;
	}
	if (desc->flags & F_RESOURCE_LIMITS) {
		for (int r = 0; r < NUM_RSRCS; r++) {
			if (desc->limits[r].max < desc->limits[r].res)
				return -EINVAL;
			if (desc->limits[r].max > d->totals[r])
				return -EINVAL;
		}
	}
	return 0;
}

/* What no service of the device reserves (the driver's shared count). */
static int available(struct state *st, const struct fake_dev *d, int r)
{
	int reserved = 0;

	for (int i = 0; i < st->nsvcs; i++)
		if (st->svcs[i].dev_id == d->dev_id)
			reserved += st->svcs[i].desc.limits[r].res;
	return reserved >= d->totals[r] ? 0 : d->totals[r] - reserved;
}

static bool limited(const struct rsrc_limit *lim)
{
	return lim->max || lim->res;
}

static bool holds_le_pool(const struct state *st, const struct fake_svc *s)
{
	const struct rsrc_limit *les = &s->desc.limits[R_LE];

	if (s->desc.svc_id == DEFAULT_SVC_ID)
		return false;
	return les->res || (st->driver.le_pool_per_service && les->max);
}

/* How many pools of the device are taken: LE pools by services, TLE pools by all. */
static int pools_taken(struct state *st, const struct fake_dev *d, bool tle)
{
	int taken = 0;

	for (int i = 0; i < st->nsvcs; i++) {
		const struct fake_svc *s = &st->svcs[i];

		if (s->dev_id != d->dev_id)
			continue;
		taken += tle ? limited(&s->desc.limits[R_TLE]) : holds_le_pool(st, s);
	}
	return taken;
}

/* The limits the driver keeps: the device totals without resource limits; TLEs, when
 * limited at all, reserved as their max and at least TLE_MIN. */
static void effective_limits(const struct fake_dev *d, struct cxi_svc_desc *desc)
{
	struct rsrc_limit *tles = &desc->limits[R_TLE];

	if (!(desc->flags & F_RESOURCE_LIMITS)) {
		for (int r = 0; r < NUM_RSRCS; r++) {
			desc->limits[r].max = d->totals[r];
			desc->limits[r].res = 0;
		}
	}
	if (limited(tles)) {
		if (tles->res < TLE_MIN)
			tles->res = TLE_MIN;
		tles->max = tles->res;
	}
}

/* The driver's reserve_rsrcs for a new service with these (effective) limits. */
static int reserve(struct state *st, const struct fake_dev *d, const struct cxi_svc_desc *desc,
		   struct cxi_svc_fail_info *fail)
{
	struct fake_svc probe = {.desc = *desc};
	struct cxi_svc_fail_info ignored;

	if (!fail)
		fail = &ignored;
	for (int r = 0; r < NUM_RSRCS; r++) {
		int avail;

		if (r == R_TLE || !limited(&desc->limits[r]))
			continue;
		avail = available(st, d, r);
		fail->rsrc_avail[r] = (uint16_t)avail;
		if (desc->limits[r].res > avail)
			return -ENOSPC;
	}
	probe.desc.svc_id = DEFAULT_SVC_ID + 1;
	if (holds_le_pool(st, &probe) && pools_taken(st, d, false) >= LE_POOLS - 1) {
		fail->no_le_pools = true;
		return -ENOSPC;
	}
	if (limited(&desc->limits[R_TLE])) {
		if (desc->limits[R_TLE].res > available(st, d, R_TLE))
			return -ENOSPC;
		if (pools_taken(st, d, true) >= TLE_POOLS) {
			fail->no_tle_pools = true;
			return -ENOSPC;
		}
	}
	return 0;
}

/* The 14.0.0 driver's profile check: -EEXIST when another service holds one of the VNIs. */
static int vnis_free(const struct state *st, const struct fake_dev *d,
		     const struct cxi_svc_desc *desc)
{
	if (!st->driver.unique_vnis || !(desc->flags & F_RESTRICTED_VNIS))
		return 0;
	for (int i = 0; i < st->nsvcs; i++) {
		const struct fake_svc *s = &st->svcs[i];

		if (s->dev_id != d->dev_id || !(s->desc.flags & F_RESTRICTED_VNIS))
			continue;
		for (int a = 0; a < s->desc.num_vld_vnis && a < MAX_VNIS; a++)
			for (int b = 0; b < desc->num_vld_vnis && b < MAX_VNIS; b++)
				if (s->desc.vnis[a] == desc->vnis[b])
					return -EEXIST;
	}
	return 0;
}

static unsigned int lowest_free_id(struct state *st, const struct fake_dev *d)
{
	unsigned int id = DEFAULT_SVC_ID + 1;

	while (find_svc(st, d->dev_id, id))
		id++;
	return id;
}

EXPORT int cxil_alloc_svc(struct cxil_dev *dev, const struct cxi_svc_desc *desc,
			  struct cxi_svc_fail_info *fail)
{
	struct state *st;
	struct fake_dev *d;
	struct fake_svc *s;
	struct cxi_svc_desc kept;
	int rc;

	if (!desc)
		return -EINVAL;
	if (fail)
		memset(fail, 0, sizeof(*fail));
	rc = check_bytes(desc);
	if (rc)
		return rc;
	st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	rc = begin(st, dev, &d);
	if (rc)
		goto out;
	kept = *desc;
	effective_limits(d, &kept);
	rc = admin_permitted(d) ? validate_desc(st, desc, d) : -EPERM;
	if (!rc)
		rc = vnis_free(st, d, desc);
	if (!rc)
		rc = reserve(st, d, &kept, fail);
	if (!rc && st->nsvcs == MAX_SVCS)
		rc = -ENOSPC;
	if (!rc) {
		s = &st->svcs[st->nsvcs++];
		memset(s, 0, sizeof(*s));
		s->dev_id = d->dev_id;
		s->lpr = 1;
		s->desc = kept;
		s->desc.svc_id = lowest_free_id(st, d);
		/* The driver ignores desc->enable: a service with restricted VNIs is enabled
		 * at once, one without waits for a VNI range. */
		if (desc->flags & F_RESTRICTED_VNIS)
			s->desc.flags |= F_ENABLE;
		else
			s->desc.flags &= (uint8_t)~F_ENABLE;
		rc = (int)s->desc.svc_id;
	}
	rc = state_done(st, rc > 0, rc);
out:
	free(st);
	return rc;
}

/* Run op for a service of dev under the lock; with writes, save when op returns >= 0. */
static int with_svc(struct cxil_dev *dev, unsigned int svc_id,
		    int (*op)(struct state *, struct fake_dev *, unsigned int, void *), void *arg,
		    bool writes)
{
	struct state *st = calloc(1, sizeof(*st));
	struct fake_dev *d;
	int rc;

	if (!st)
		return -ENOMEM;
	rc = begin(st, dev, &d);
	if (!rc) {
		rc = op(st, d, svc_id, arg);
		rc = state_done(st, writes && rc >= 0, rc);
	}
	free(st);
	return rc;
}

static int op_destroy(struct state *st, struct fake_dev *d, unsigned int svc_id, void *arg)
{
	struct fake_svc *s = find_svc(st, d->dev_id, svc_id);

	(void)arg;
	if (!admin_permitted(d))
		return -EPERM;
	if (svc_id == DEFAULT_SVC_ID || !s)
		return -EINVAL;
	if (s->busy)
		return -EBUSY;
	*s = st->svcs[--st->nsvcs];
	return 0;
}

EXPORT int cxil_destroy_svc(struct cxil_dev *dev, unsigned int svc_id)
{
	return with_svc(dev, svc_id, op_destroy, NULL, true);
}

static int op_enable(struct state *st, struct fake_dev *d, unsigned int svc_id, void *arg)
{
	struct fake_svc *s = find_svc(st, d->dev_id, svc_id);
	bool enable = *(bool *)arg;

	if (!admin_permitted(d))
		return -EPERM;
	if (!s)
		return -EINVAL;
	if (enable && !(s->desc.flags & F_RESTRICTED_VNIS) && !s->vni_max)
		return -EINVAL;
	if (enable)
		s->desc.flags |= F_ENABLE;
	else
		s->desc.flags &= (uint8_t)~F_ENABLE;
	return 0;
}

EXPORT int cxil_svc_enable(struct cxil_dev *dev, unsigned int svc_id, bool enable)
{
	return with_svc(dev, svc_id, op_enable, &enable, true);
}

static int op_set_vni_range(struct state *st, struct fake_dev *d, unsigned int svc_id, void *arg)
{
	struct fake_svc *s = find_svc(st, d->dev_id, svc_id);
	const uint16_t *range = arg;
	unsigned int size = (unsigned int)range[1] - range[0] + 1;

	if (!admin_permitted(d))
		return -EPERM;
	if (!s || (s->desc.flags & F_RESTRICTED_VNIS))
		return -EINVAL;
	if (range[0] < 1 || range[1] < range[0] || (size & (size - 1)) || range[0] % size)
		return -EINVAL;
	s->vni_min = range[0];
	s->vni_max = range[1];
	s->desc.flags |= F_ENABLE;
	return 0;
}

EXPORT int cxil_svc_set_vni_range(struct cxil_dev *dev, unsigned int svc_id, uint16_t vni_min,
				  uint16_t vni_max)
{
	uint16_t range[2] = {vni_min, vni_max};

	return with_svc(dev, svc_id, op_set_vni_range, range, true);
}

#ifndef NO_NETNS
static int op_set_netns(struct state *st, struct fake_dev *d, unsigned int svc_id, void *arg)
{
	struct fake_svc *s;

	if (!st->driver.netns_ops) /* an op the driver does not know: before the admin gate */
		return -EINVAL;
	if (!admin_permitted(d))
		return -EPERM;
	s = find_svc(st, d->dev_id, svc_id);
	if (!s)
		return -EINVAL;
	if (!(s->desc.flags & F_RESTRICTED_MEMBERS))
		return -EEXIST;
	for (int i = 0; i < NUM_MEMBERS; i++)
		if (s->desc.members[i].type == MEMBER_UID || s->desc.members[i].type == MEMBER_GID)
			return -EEXIST;
	if (s->desc.flags & F_ENABLE) /* the driver refuses to change an enabled rgroup */
		return -EBUSY;
	s->netns = *(unsigned int *)arg;
	return 0;
}

EXPORT int cxil_svc_set_netns(struct cxil_dev *dev, unsigned int svc_id, unsigned int netns)
{
	return with_svc(dev, svc_id, op_set_netns, &netns, true);
}

static int op_get_netns(struct state *st, struct fake_dev *d, unsigned int svc_id, void *arg)
{
	struct fake_svc *s = find_svc(st, d->dev_id, svc_id);

	/* Like the driver: -EINVAL for an unknown service and for one with no netns. */
	if (!st->driver.netns_ops || !s || !s->netns)
		return -EINVAL;
	*(unsigned int *)arg = s->netns;
	return 0;
}

EXPORT int cxil_svc_get_netns(struct cxil_dev *dev, unsigned int svc_id, unsigned int *netns)
{
	unsigned int value = 0;
	int rc;

	if (!netns)
		return -EINVAL;
	rc = with_svc(dev, svc_id, op_get_netns, &value, false);
	if (!rc)
		*netns = value;
	return rc;
}
#endif

static int op_rsrc_use(struct state *st, struct fake_dev *d, unsigned int svc_id, void *arg)
{
	struct fake_svc *s = find_svc(st, d->dev_id, svc_id);
	struct cxi_rsrc_use *use = arg;

	if (!s)
		return -EINVAL;
	/* Like the driver's single-service answer: svc_id left 0. LE and TLE counts only for
	 * a service with a pool of its own (or the default one). */
	memset(use, 0, sizeof(*use));
	memcpy(use->in_use, s->in_use, sizeof(use->in_use));
	if (svc_id != DEFAULT_SVC_ID) {
		if (!s->desc.limits[R_LE].res)
			use->in_use[R_LE] = NOT_APPLICABLE;
		if (!s->desc.limits[R_TLE].res)
			use->in_use[R_TLE] = NOT_APPLICABLE;
	}
	return 0;
}

/* Run a reading op into a copy, and hand the copy out only when it succeeds. */
static int copy_out(struct cxil_dev *dev, unsigned int svc_id,
		    int (*op)(struct state *, struct fake_dev *, unsigned int, void *), void *out,
		    size_t size)
{
	union {
		struct cxi_svc_desc desc;
		struct cxi_rsrc_use use;
	} copy;
	int rc;

	if (!out || size > sizeof(copy))
		return -EINVAL;
	rc = with_svc(dev, svc_id, op, &copy, false);
	if (!rc)
		memcpy(out, &copy, size);
	return rc;
}

EXPORT int cxil_get_svc_rsrc_use(struct cxil_dev *dev, unsigned int svc_id,
				 struct cxi_rsrc_use *rsrcs)
{
	return copy_out(dev, svc_id, op_rsrc_use, rsrcs, sizeof(*rsrcs));
}

static int op_set_lpr(struct state *st, struct fake_dev *d, unsigned int svc_id, void *arg)
{
	struct fake_svc *s;
	unsigned int lpr = *(unsigned int *)arg;

	if (!admin_permitted(d))
		return -EPERM;
	if (lpr > MAX_LPR)
		return -EINVAL;
	s = find_svc(st, d->dev_id, svc_id);
	if (!s)
		return -EINVAL;
	if (s->busy) /* the driver refuses while an LNI uses the service */
		return -EBUSY;
	s->lpr = lpr;
	return 0;
}

EXPORT int cxil_set_svc_lpr(struct cxil_dev *dev, unsigned int svc_id, unsigned int lnis_per_rgid)
{
	return with_svc(dev, svc_id, op_set_lpr, &lnis_per_rgid, true);
}

static int op_get_lpr(struct state *st, struct fake_dev *d, unsigned int svc_id, void *arg)
{
	struct fake_svc *s = find_svc(st, d->dev_id, svc_id);

	if (!s)
		return -EINVAL;
	*(unsigned int *)arg = s->lpr;
	return 0;
}

EXPORT int cxil_get_svc_lpr(struct cxil_dev *dev, unsigned int svc_id)
{
	unsigned int lpr = 0;
	int rc = with_svc(dev, svc_id, op_get_lpr, &lpr, false);

	return rc ? rc : (int)lpr;
}

static int op_get_svc(struct state *st, struct fake_dev *d, unsigned int svc_id, void *arg)
{
	struct fake_svc *s = find_svc(st, d->dev_id, svc_id);

	if (!s)
		return -EINVAL;
	memcpy(arg, &s->desc, sizeof(s->desc));
	return 0;
}

EXPORT int cxil_get_svc(struct cxil_dev *dev, unsigned int svc_id, struct cxi_svc_desc *desc)
{
	return copy_out(dev, svc_id, op_get_svc, desc, sizeof(*desc));
}

static int op_list(struct state *st, struct fake_dev *d, unsigned int unused, void *arg)
{
	struct cxil_svc_list *list;
	uint32_t count = 0;

	(void)unused;
	for (int i = 0; i < st->nsvcs; i++)
		count += st->svcs[i].dev_id == d->dev_id;
	list = malloc(sizeof(*list) + count * sizeof(list->descs[0]));
	if (!list)
		return -ENOMEM;
	list->count = 0;
	for (int i = 0; i < st->nsvcs; i++)
		if (st->svcs[i].dev_id == d->dev_id)
			list->descs[list->count++] = st->svcs[i].desc;
	*(struct cxil_svc_list **)arg = list;
	return 0;
}

EXPORT int cxil_get_svc_list(struct cxil_dev *dev, struct cxil_svc_list **list)
{
	if (!list)
		return -EINVAL;
	return with_svc(dev, 0, op_list, list, false);
}

EXPORT void cxil_free_svc_list(struct cxil_svc_list *list)
{
	free(list);
}

/* ---- Helpers for the layout tests; not part of libcxi. ---- */

/* The layout as this compiler sees it, e.g. "size=68 align=4 vnis=2 ...". */
EXPORT int fake_libcxi_layout(char *buf, size_t len)
{
	return snprintf(buf, len,
			"size=68 align=%zu num_vld_vnis=%zu vnis=%zu tcs=%zu members=%zu "
			"member_size=%zu limits=%zu svc_id=%zu fail_size=%zu list_descs=%zu "
			"devinfo_name=%zu",
			_Alignof(struct cxi_svc_desc), offsetof(struct cxi_svc_desc, num_vld_vnis),
			offsetof(struct cxi_svc_desc, vnis), offsetof(struct cxi_svc_desc, tcs),
			offsetof(struct cxi_svc_desc, members), sizeof(struct svc_member),
			offsetof(struct cxi_svc_desc, limits), offsetof(struct cxi_svc_desc, svc_id),
			sizeof(struct cxi_svc_fail_info), offsetof(struct cxil_svc_list, descs),
			offsetof(struct cxil_dev, device_name));
}

/* Every field of a desc as C reads it, as text. */
EXPORT int fake_libcxi_describe(const struct cxi_svc_desc *d, char *buf, size_t len)
{
	int n = snprintf(buf, len,
			 "rm=%d rv=%d rt=%d rl=%d en=%d sys=%d pool=%d nvnis=%u vnis=%u,%u,%u,%u "
			 "tcs=%d,%d,%d,%d,%d m0=%u:%d m1=%u:%d limits=",
			 !!(d->flags & F_RESTRICTED_MEMBERS), !!(d->flags & F_RESTRICTED_VNIS),
			 !!(d->flags & F_RESTRICTED_TCS), !!(d->flags & F_RESOURCE_LIMITS),
			 !!(d->flags & F_ENABLE), !!(d->flags & F_IS_SYSTEM_SVC), d->flags >> 6,
			 d->num_vld_vnis, d->vnis[0], d->vnis[1], d->vnis[2], d->vnis[3], d->tcs[0],
			 d->tcs[1], d->tcs[2], d->tcs[3], d->tcs[4], d->members[0].id,
			 d->members[0].type, d->members[1].id, d->members[1].type);

	for (int r = 0; r < NUM_RSRCS && n > 0 && (size_t)n < len; r++)
		n += snprintf(buf + n, len - n, "%s%u/%u", r ? "," : "", d->limits[r].max,
			      d->limits[r].res);
	if (n > 0 && (size_t)n < len)
		n += snprintf(buf + n, len - n, " svc_id=%u", d->svc_id);
	return n;
}

/* A desc filled through C field names, for the decoding side of the layout tests. */
EXPORT void fake_libcxi_sample_desc(struct cxi_svc_desc *d)
{
	memset(d, 0, sizeof(*d));
	d->flags = F_RESTRICTED_MEMBERS | F_RESTRICTED_TCS | F_ENABLE | (2 << 6);
	d->num_vld_vnis = 3;
	d->vnis[0] = 1;
	d->vnis[1] = 0x1234;
	d->vnis[2] = 65535;
	d->vnis[3] = 7; /* beyond num_vld_vnis */
	d->tcs[1] = true;
	d->tcs[4] = true;
	d->members[0].id = 1000;
	d->members[0].type = MEMBER_UID;
	d->members[1].id = 4026531840u;
	d->members[1].type = MEMBER_NET_NS;
	for (int r = 0; r < NUM_RSRCS; r++) {
		d->limits[r].max = (uint16_t)(100 * (r + 1));
		d->limits[r].res = (uint16_t)r;
	}
	d->svc_id = 0xA1B2C3D4u;
}
