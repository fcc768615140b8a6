/*
 * A TEST-ONLY stand-in for VMware's VDDK (libvixDiskLib.so), which cannot be downloaded here. It implements the
 * VDDK 7 C ABI (layouts in ../shared/VMWARE.md §3) over local files and enforces the rules the real library
 * imposes or the programming guide demands, so that diskvault's production loader and data path are tested
 * exactly as they would run against the real one. Built by the test fixtures (tests/common/vddk.rs) with gcc.
 *
 * Configuration (environment, read at InitEx):
 *   FAKE_VDDK_DATASTORES  "NAME=DIR;NAME2=DIR2": a disk "[NAME] vm/disk.vmdk" is the file DIR/vm/disk-flat.vmdk;
 *                         with a snapshot ref S, DIR/vm/disk-flat.vmdk@S if that exists (a frozen image).
 *   FAKE_VDDK_USER / FAKE_VDDK_PASSWORD / FAKE_VDDK_THUMBPRINT   expected credentials (any if unset)
 *   FAKE_VDDK_FAIL_READ_SECTOR  Read/ReadAsync covering this sector fail with VIX_E_DISK_NOIO (16002)
 *   FAKE_VDDK_READ_DELAY_MS  every read takes this long (a slow network, to interrupt a backup)
 *   FAKE_VDDK_LOG         file receiving one line per event: calls, bytes read, rule violations ("VIOLATION ...")
 *
 * A connection without a server name is local (hosted disks): Open takes a file path, Create makes a
 * monolithicSparse VMDK (VMware's sparse extent format, readable by qemu-img), and Clone copies a local disk onto
 * a datastore as a flat VMDK (descriptor + -flat file), as the real library does for managed disks.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef uint64_t VixError;
typedef char Bool;
typedef void VixDiskLibGenericLogFunc(const char *fmt, va_list args);
typedef void (*VixDiskLibCompletionCB)(void *cbData, VixError result);

#define VIX_OK 0
#define VIX_E_FAIL 1
#define VIX_E_INVALID_ARG 3
#define VIX_E_FILE_NOT_FOUND 4
#define VIX_E_OBJECT_IS_BUSY 5
#define VIX_E_NOT_SUPPORTED 6
#define VIX_E_FILE_ERROR 7
#define VIX_E_FILE_READ_ONLY 11
#define VIX_E_FILE_ALREADY_EXISTS 12
#define VIX_E_AUTHENTICATION_FAIL 35
#define VIX_E_DISK_NOINIT 16001
#define VIX_E_DISK_NOIO 16002
#define VIX_E_DISK_OUTOFRANGE 16007
#define VIX_E_DISK_INVALID_CONNECTION 16054
#define VIX_E_CANNOT_CONNECT_TO_HOST 18000
#define VIX_ASYNC 25000
#define VIXDISKLIB_FLAG_OPEN_READ_ONLY 4

typedef struct {
    char *vmxSpec;
    char *serverName;
    char *thumbPrint;
    long privateUse;
    int credType;
    union {
        struct { char *userName; char *password; } uid;
        struct { char *cookie; char *userName; char *key; } sessionId;
        void *ticketId;
    } creds;
    uint32_t port;
    uint32_t nfcHostPort;
    char *vimApiVer;
    char reserved[8];
    void *state;
    union { struct { char *id; char *datastoreMoRef; char *ssId; } vStorageObjSpec; } spec;
    int specType;
} VixDiskLibConnectParams;

typedef struct { uint32_t cylinders, heads, sectors; } VixDiskLibGeometry;
typedef struct {
    VixDiskLibGeometry biosGeo, physGeo;
    uint64_t capacity;
    int adapterType;
    int numLinks;
    char *parentFileNameHint;
    char *uuid;
    uint32_t logicalSectorSize, physicalSectorSize;
} VixDiskLibInfo;
typedef struct { uint64_t offset, length; } VixDiskLibBlock;
typedef struct { uint32_t numBlocks; VixDiskLibBlock blocks[1]; } VixDiskLibBlockList;

struct Connection { char *snapshot; char *transport; int local; };
struct Handle {
    int fd;
    uint64_t sectors;
    int read_only;
    volatile int busy; /* I/O in progress: a second concurrent call is a violation */
    char *path;
    /* A sparse VMDK: grain size (sectors), the grain table entries (all tables are contiguous), where they are. */
    int sparse;
    uint64_t grain;
    uint64_t ngrains;
    uint32_t *gt;
    uint64_t gt_sector;
};

typedef struct {
    int diskType;
    int adapterType;
    uint16_t hwVersion;
    uint64_t capacity;
    uint32_t logicalSectorSize, physicalSectorSize;
} VixDiskLibCreateParams;
typedef Bool (*VixDiskLibProgressFunc)(void *data, int percent);

#define DISK_MONOLITHIC_SPARSE 1
#define DISK_VMFS_THIN 7
#define GRAIN_SECTORS 128
#define GTES_PER_GT 512
#define DESCRIPTOR_SECTORS 20

static int initialized;
static pthread_t open_close_thread;
static int open_close_thread_set;
static int prepared; /* PrepareForAccess minus EndAccess */
static VixDiskLibGenericLogFunc *log_fn, *warn_fn;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static void event(const char *fmt, ...) {
    const char *path = getenv("FAKE_VDDK_LOG");
    if (!path) return;
    pthread_mutex_lock(&log_lock);
    FILE *f = fopen(path, "a");
    if (f) {
        va_list ap;
        va_start(ap, fmt);
        vfprintf(f, fmt, ap);
        va_end(ap);
        fputc('\n', f);
        fclose(f);
    }
    pthread_mutex_unlock(&log_lock);
}

/* Calls the application's log callback, as the real library does from its own threads. */
static void lib_log(VixDiskLibGenericLogFunc *fn, const char *fmt, ...) {
    if (!fn) return;
    va_list ap;
    va_start(ap, fmt);
    fn(fmt, ap);
    va_end(ap);
}

static void check_open_close_thread(const char *what) {
    if (!open_close_thread_set) {
        open_close_thread = pthread_self();
        open_close_thread_set = 1;
    } else if (!pthread_equal(open_close_thread, pthread_self())) {
        event("VIOLATION %s called from a different thread than earlier Open/Close calls", what);
    }
}

VixError VixDiskLib_InitEx(uint32_t major, uint32_t minor, VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warn,
                           VixDiskLibGenericLogFunc *panic, const char *libDir, const char *configFile) {
    (void)minor; (void)libDir; (void)configFile;
    if (initialized) event("VIOLATION InitEx called twice");
    if (!log || !warn || !panic) event("VIOLATION InitEx with NULL log callbacks (the defaults are not thread-safe)");
    if (major != 8 && major != 7) return VIX_E_NOT_SUPPORTED;
    log_fn = log;
    warn_fn = warn;
    initialized = 1;
    event("InitEx %u.%u", major, minor);
    lib_log(log_fn, "VixDiskLib: fake VDDK %d.%d initialised (%s)\n", 8, 0, "test library");
    return VIX_OK;
}

void VixDiskLib_Exit(void) {
    if (prepared > 0) event("VIOLATION Exit with %d PrepareForAccess not ended", prepared);
    event("Exit");
    initialized = 0;
}

const char *VixDiskLib_ListTransportModes(void) { return "file:nbd:nbdssl"; }

VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void) { return calloc(1, sizeof(VixDiskLibConnectParams)); }
void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *p) { free(p); }

static int str_eq_env(const char *value, const char *env) {
    const char *want = getenv(env);
    return !want || (value && strcmp(value, want) == 0);
}

VixError VixDiskLib_PrepareForAccess(const VixDiskLibConnectParams *p, const char *identity) {
    if (!initialized) return VIX_E_DISK_NOINIT;
    if (!p || !p->vmxSpec || strncmp(p->vmxSpec, "moref=", 6) != 0 || !identity) return VIX_E_INVALID_ARG;
    prepared++;
    event("PrepareForAccess %s %s", p->vmxSpec, identity);
    return VIX_OK;
}

VixError VixDiskLib_EndAccess(const VixDiskLibConnectParams *p, const char *identity) {
    if (!initialized) return VIX_E_DISK_NOINIT;
    (void)identity;
    /* Without a PrepareForAccess in this process it ends one of a process that died (the guide's remedy); the
     * tests count both calls across all processes of a test. */
    prepared--;
    event("EndAccess %s", p && p->vmxSpec ? p->vmxSpec : "?");
    return VIX_OK;
}

VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *p, Bool readOnly, const char *snapshotRef,
                              const char *transportModes, struct Connection **out) {
    if (!initialized) return VIX_E_DISK_NOINIT;
    if (!p || !out) return VIX_E_INVALID_ARG;
    if (!p->serverName || !*p->serverName) {
        if (p->vmxSpec) return VIX_E_INVALID_ARG; /* a VM lives on a server */
        struct Connection *c = calloc(1, sizeof *c);
        c->local = 1;
        c->transport = strdup("file");
        event("ConnectEx local readOnly=%d", readOnly);
        *out = c;
        return VIX_OK;
    }
    if (!str_eq_env(p->thumbPrint, "FAKE_VDDK_THUMBPRINT")) {
        event("ConnectEx refused: thumbprint %s", p->thumbPrint ? p->thumbPrint : "(none)");
        return VIX_E_CANNOT_CONNECT_TO_HOST;
    }
    if (p->credType == 1) {
        if (!str_eq_env(p->creds.uid.userName, "FAKE_VDDK_USER") || !str_eq_env(p->creds.uid.password, "FAKE_VDDK_PASSWORD"))
            return VIX_E_AUTHENTICATION_FAIL;
    } else if (p->credType == 2) {
        if (!p->creds.sessionId.cookie || !*p->creds.sessionId.cookie || !p->creds.sessionId.key ||
            !*p->creds.sessionId.key)
            return VIX_E_AUTHENTICATION_FAIL;
    } else {
        return VIX_E_INVALID_ARG;
    }
    struct Connection *c = calloc(1, sizeof *c);
    c->snapshot = snapshotRef ? strdup(snapshotRef) : NULL;
    /* The fake reads local files whatever was asked; it reports the first mode it was allowed. */
    const char *mode = transportModes && *transportModes ? transportModes : "nbdssl";
    c->transport = strndup(mode, strcspn(mode, ":"));
    event("ConnectEx %s readOnly=%d snapshot=%s modes=%s", p->vmxSpec ? p->vmxSpec : "?", readOnly,
          snapshotRef ? snapshotRef : "", transportModes ? transportModes : "");
    *out = c;
    return VIX_OK;
}

VixError VixDiskLib_Disconnect(struct Connection *c) {
    if (!c) return VIX_E_DISK_INVALID_CONNECTION;
    event("Disconnect");
    free(c->snapshot);
    free(c->transport);
    free(c);
    return VIX_OK;
}

VixError VixDiskLib_Cleanup(const VixDiskLibConnectParams *p, uint32_t *cleaned, uint32_t *remaining) {
    (void)p;
    if (cleaned) *cleaned = 0;
    if (remaining) *remaining = 0;
    return VIX_OK;
}

/* "[DS] dir/name.vmdk" -> DSDIR/dir/name-flat.vmdk (and @snapshot). */
static char *resolve(const char *path, const char *snapshot) {
    const char *stores = getenv("FAKE_VDDK_DATASTORES");
    if (!stores || path[0] != '[') return NULL;
    const char *close = strchr(path, ']');
    if (!close) return NULL;
    size_t nlen = (size_t)(close - path - 1);
    const char *rel = close + 1;
    while (*rel == ' ') rel++;
    const char *p = stores;
    while (*p) {
        const char *eq = strchr(p, '=');
        const char *end = strchr(p, ';');
        if (!end) end = p + strlen(p);
        if (eq && eq < end && (size_t)(eq - p) == nlen && strncmp(p, path + 1, nlen) == 0) {
            char base[4096];
            size_t rl = strlen(rel);
            if (rl < 5 || strcmp(rel + rl - 5, ".vmdk") != 0) return NULL;
            snprintf(base, sizeof base, "%.*s/%.*s-flat.vmdk", (int)(end - eq - 1), eq + 1, (int)(rl - 5), rel);
            if (snapshot && *snapshot) {
                char snap[4200];
                struct stat st;
                snprintf(snap, sizeof snap, "%s@%s", base, snapshot);
                if (stat(snap, &st) == 0) return strdup(snap);
            }
            return strdup(base);
        }
        p = *end ? end + 1 : end;
    }
    return NULL;
}

static void put32(uint8_t *b, uint32_t v) { memcpy(b, &v, 4); }
static void put64(uint8_t *b, uint64_t v) { memcpy(b, &v, 8); }
static uint32_t get32(const uint8_t *b) { uint32_t v; memcpy(&v, b, 4); return v; }
static uint64_t get64(const uint8_t *b) { uint64_t v; memcpy(&v, b, 8); return v; }

/* A local file starting with "KDMV" is a sparse VMDK: read its header and grain tables. */
static VixError load_sparse(struct Handle *h) {
    uint8_t hdr[512];
    if (pread(h->fd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr || memcmp(hdr, "KDMV", 4) != 0) return VIX_OK;
    uint64_t capacity = get64(hdr + 12), grain = get64(hdr + 20), gd = get64(hdr + 56);
    if (grain == 0 || get32(hdr + 44) != GTES_PER_GT) return VIX_E_FILE_ERROR;
    uint32_t first_gt;
    if (pread(h->fd, &first_gt, 4, (off_t)(gd * 512)) != 4) return VIX_E_FILE_ERROR;
    h->sparse = 1;
    h->grain = grain;
    h->sectors = capacity;
    h->ngrains = (capacity + grain - 1) / grain;
    h->gt_sector = first_gt;
    h->gt = calloc(h->ngrains, 4);
    if (pread(h->fd, h->gt, h->ngrains * 4, (off_t)(h->gt_sector * 512)) != (ssize_t)(h->ngrains * 4))
        return VIX_E_FILE_ERROR;
    return VIX_OK;
}

/* Reads or writes whole sectors of a disk, through the grain tables when it is sparse. */
static int disk_io(struct Handle *h, int write, uint64_t start, uint64_t n, uint8_t *buf) {
    if (!h->sparse) {
        size_t len = (size_t)n * 512, done = 0;
        while (done < len) {
            ssize_t r = write ? pwrite(h->fd, buf + done, len - done, (off_t)(start * 512 + done))
                              : pread(h->fd, buf + done, len - done, (off_t)(start * 512 + done));
            if (r <= 0) return -1;
            done += (size_t)r;
        }
        return 0;
    }
    while (n > 0) {
        uint64_t g = start / h->grain, in = start % h->grain, k = h->grain - in;
        if (k > n) k = n;
        uint32_t at = h->gt[g];
        if (!at && write) {
            /* A new grain at the end of the file, zero-filled, then recorded in its grain table. */
            off_t end = lseek(h->fd, 0, SEEK_END);
            uint64_t sector = ((uint64_t)end / 512 + h->grain - 1) / h->grain * h->grain;
            if (ftruncate(h->fd, (off_t)((sector + h->grain) * 512)) != 0) return -1;
            at = (uint32_t)sector;
            if (pwrite(h->fd, &at, 4, (off_t)(h->gt_sector * 512 + g * 4)) != 4) return -1;
            h->gt[g] = at;
        }
        if (write) {
            if (pwrite(h->fd, buf, k * 512, (off_t)((at + in) * 512)) != (ssize_t)(k * 512)) return -1;
        } else if (!at) {
            memset(buf, 0, k * 512);
        } else if (pread(h->fd, buf, k * 512, (off_t)((at + in) * 512)) != (ssize_t)(k * 512)) {
            return -1;
        }
        buf += k * 512;
        start += k;
        n -= k;
    }
    return 0;
}

/* Writes an empty monolithicSparse VMDK of `capacity` sectors (header, descriptor, grain directory, tables). */
static VixError create_sparse(const char *path, uint64_t capacity, int adapter, int hw) {
    uint64_t ngrains = (capacity + GRAIN_SECTORS - 1) / GRAIN_SECTORS;
    uint64_t ngts = (ngrains + GTES_PER_GT - 1) / GTES_PER_GT;
    uint64_t gd = 1 + DESCRIPTOR_SECTORS, gd_sectors = (ngts * 4 + 511) / 512;
    uint64_t gt0 = gd + gd_sectors, gt_sectors = ngts * GTES_PER_GT * 4 / 512;
    uint64_t overhead = (gt0 + gt_sectors + GRAIN_SECTORS - 1) / GRAIN_SECTORS * GRAIN_SECTORS;
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0644);
    if (fd < 0) return errno == EEXIST ? VIX_E_FILE_ALREADY_EXISTS : VIX_E_FILE_ERROR;
    uint8_t *meta = calloc(overhead, 512);
    memcpy(meta, "KDMV", 4);
    put32(meta + 4, 1);          /* version */
    put32(meta + 8, 1);          /* flags: newline detection valid */
    put64(meta + 12, capacity);
    put64(meta + 20, GRAIN_SECTORS);
    put64(meta + 28, 1);         /* descriptor offset */
    put64(meta + 36, DESCRIPTOR_SECTORS);
    put32(meta + 44, GTES_PER_GT);
    put64(meta + 48, 0);         /* no redundant grain directory */
    put64(meta + 56, gd);
    put64(meta + 64, overhead);
    memcpy(meta + 73, "\n \r\n", 4); /* after uncleanShutdown */
    const char *base = strrchr(path, '/');
    uint64_t cyl = capacity / (255 * 63);
    snprintf((char *)meta + 512, DESCRIPTOR_SECTORS * 512,
             "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\n"
             "# Extent description\nRW %llu SPARSE \"%s\"\n\n# The Disk Data Base\n#DDB\n\n"
             "ddb.virtualHWVersion = \"%d\"\nddb.adapterType = \"%s\"\nddb.geometry.cylinders = \"%llu\"\n"
             "ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n",
             (unsigned long long)capacity, base ? base + 1 : path, hw, adapter == 1 ? "ide" : "lsilogic",
             (unsigned long long)(cyl > 65535 ? 65535 : cyl));
    for (uint64_t i = 0; i < ngts; i++) put32(meta + gd * 512 + i * 4, (uint32_t)(gt0 + i * GTES_PER_GT * 4 / 512));
    int ok = pwrite(fd, meta, overhead * 512, 0) == (ssize_t)(overhead * 512);
    free(meta);
    close(fd);
    return ok ? VIX_OK : VIX_E_FILE_ERROR;
}

VixError VixDiskLib_Create(const struct Connection *c, const char *path, const VixDiskLibCreateParams *p,
                           VixDiskLibProgressFunc progress, void *data) {
    (void)progress;
    (void)data;
    if (!initialized) return VIX_E_DISK_NOINIT;
    if (!c || !path || !p || p->capacity == 0) return VIX_E_INVALID_ARG;
    check_open_close_thread("Create");
    /* As the real library: Create makes hosted disks only; managed disks come from Clone. */
    if (!c->local || p->diskType != DISK_MONOLITHIC_SPARSE) return VIX_E_NOT_SUPPORTED;
    VixError e = create_sparse(path, p->capacity, p->adapterType, p->hwVersion);
    event("Create %s type=%d adapter=%d hw=%d capacity=%llu -> %llu", path, p->diskType, p->adapterType,
          p->hwVersion, (unsigned long long)p->capacity, (unsigned long long)e);
    return e;
}

VixError VixDiskLib_Clone(const struct Connection *dst, const char *dst_path, const struct Connection *src,
                          const char *src_path, const VixDiskLibCreateParams *p, VixDiskLibProgressFunc progress,
                          void *data, Bool overwrite) {
    if (!initialized) return VIX_E_DISK_NOINIT;
    if (!dst || !dst_path || !src || !src_path || !p) return VIX_E_INVALID_ARG;
    check_open_close_thread("Clone");
    if (dst->local || !src->local || p->diskType != DISK_VMFS_THIN) return VIX_E_NOT_SUPPORTED;
    char *flat = resolve(dst_path, NULL);
    if (!flat) return VIX_E_FILE_NOT_FOUND;
    struct Handle in = {0};
    in.fd = open(src_path, O_RDONLY);
    if (in.fd < 0) {
        free(flat);
        return VIX_E_FILE_NOT_FOUND;
    }
    VixError e = load_sparse(&in);
    int out = -1;
    if (e == VIX_OK && !in.sparse) e = VIX_E_NOT_SUPPORTED;
    if (e == VIX_OK) {
        out = open(flat, O_RDWR | O_CREAT | (overwrite ? O_TRUNC : O_EXCL), 0644);
        if (out < 0) e = errno == EEXIST ? VIX_E_FILE_ALREADY_EXISTS : VIX_E_FILE_ERROR;
    }
    uint64_t copied = 0;
    if (e == VIX_OK && ftruncate(out, (off_t)(in.sectors * 512)) != 0) e = VIX_E_FILE_ERROR;
    uint8_t *buf = malloc(in.grain * 512);
    for (uint64_t g = 0; e == VIX_OK && g < in.ngrains; g++) {
        if (!in.gt[g]) continue; /* thin: unallocated grains stay holes */
        uint64_t n = in.grain;
        if ((g + 1) * in.grain > in.sectors) n = in.sectors - g * in.grain;
        if (disk_io(&in, 0, g * in.grain, n, buf) != 0 || pwrite(out, buf, n * 512, (off_t)(g * in.grain * 512)) !=
                                                               (ssize_t)(n * 512))
            e = VIX_E_FILE_ERROR;
        copied += n;
        if (progress) progress(data, (int)(g * 100 / in.ngrains));
    }
    free(buf);
    if (out >= 0) close(out);
    if (e == VIX_OK) {
        /* The descriptor next to the flat extent: "[DS] dir/name.vmdk" -> DIR/dir/name.vmdk. */
        char desc[4200];
        size_t fl = strlen(flat);
        snprintf(desc, sizeof desc, "%.*s.vmdk", (int)(fl - 10), flat);
        FILE *f = fopen(desc, "w");
        const char *base = strrchr(flat, '/');
        if (f) {
            fprintf(f, "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n"
                       "RW %llu VMFS \"%s\"\n\nddb.thinProvisioned = \"1\"\n",
                    (unsigned long long)in.sectors, base ? base + 1 : flat);
            fclose(f);
        } else {
            e = VIX_E_FILE_ERROR;
        }
    }
    event("Clone %s -> %s (%s) sectors=%llu copied=%llu -> %llu", src_path, dst_path, flat,
          (unsigned long long)in.sectors, (unsigned long long)copied, (unsigned long long)e);
    close(in.fd);
    free(in.gt);
    free(flat);
    return e;
}

VixError VixDiskLib_Open(const struct Connection *c, const char *path, uint32_t flags, struct Handle **out) {
    if (!initialized) return VIX_E_DISK_NOINIT;
    if (!c || !path || !out) return VIX_E_INVALID_ARG;
    check_open_close_thread("Open");
    char *file = c->local ? strdup(path) : resolve(path, c->snapshot);
    if (!file) return VIX_E_FILE_NOT_FOUND;
    int ro = (flags & VIXDISKLIB_FLAG_OPEN_READ_ONLY) != 0;
    int fd = open(file, ro ? O_RDONLY : O_RDWR);
    if (fd < 0) {
        free(file);
        return errno == ENOENT ? VIX_E_FILE_NOT_FOUND : VIX_E_FILE_ERROR;
    }
    struct stat st;
    fstat(fd, &st);
    struct Handle *h = calloc(1, sizeof *h);
    h->fd = fd;
    h->sectors = (uint64_t)st.st_size / 512;
    h->read_only = ro;
    h->path = file;
    if (c->local && load_sparse(h) != VIX_OK) {
        close(fd);
        free(file);
        free(h);
        return VIX_E_FILE_ERROR;
    }
    event("Open %s -> %s readOnly=%d", path, file, ro);
    *out = h;
    return VIX_OK;
}

VixError VixDiskLib_Close(struct Handle *h) {
    if (!h) return VIX_E_INVALID_ARG;
    check_open_close_thread("Close");
    if (h->busy) event("VIOLATION Close during I/O");
    event("Close %s", h->path);
    close(h->fd);
    free(h->path);
    free(h->gt);
    free(h);
    return VIX_OK;
}

const char *VixDiskLib_GetTransportMode(struct Handle *h) { (void)h; return "nbdssl"; }

VixError VixDiskLib_GetInfo(struct Handle *h, VixDiskLibInfo **out) {
    if (!h || !out) return VIX_E_INVALID_ARG;
    VixDiskLibInfo *i = calloc(1, sizeof *i);
    i->capacity = h->sectors;
    /* A capacity no VMware disk has, to test that it is not believed. */
    const char *capacity = getenv("FAKE_VDDK_CAPACITY_SECTORS");
    if (capacity) i->capacity = strtoull(capacity, NULL, 10);
    i->adapterType = 3;
    i->numLinks = 1;
    i->uuid = strdup("60 00 C2 9a 5b 1e 2f 3c-4d 5e 6f 70 81 92 a3 b4");
    i->logicalSectorSize = 512;
    i->physicalSectorSize = 512;
    *out = i;
    return VIX_OK;
}

void VixDiskLib_FreeInfo(VixDiskLibInfo *i) {
    if (i) free(i->uuid);
    free(i);
}

static VixError do_read(struct Handle *h, uint64_t start, uint64_t n, uint8_t *buf) {
    if (!initialized) return VIX_E_DISK_NOINIT;
    if (!h || !buf) return VIX_E_INVALID_ARG;
    if (__sync_lock_test_and_set(&h->busy, 1)) {
        event("VIOLATION concurrent I/O on one handle");
        return VIX_E_OBJECT_IS_BUSY;
    }
    VixError err = VIX_OK;
    const char *fail = getenv("FAKE_VDDK_FAIL_READ_SECTOR");
    if (n == 0 || start + n > h->sectors) {
        err = VIX_E_DISK_OUTOFRANGE;
    } else if (fail && strtoull(fail, NULL, 10) >= start && strtoull(fail, NULL, 10) < start + n) {
        event("Read failure injected at sector %s", fail);
        err = VIX_E_DISK_NOIO;
    } else {
        const char *delay = getenv("FAKE_VDDK_READ_DELAY_MS");
        if (delay) usleep((useconds_t)atoi(delay) * 1000);
        if (disk_io(h, 0, start, n, buf) != 0) err = VIX_E_FILE_ERROR;
        if (err == VIX_OK) event("Read %llu %llu", (unsigned long long)start, (unsigned long long)n);
    }
    __sync_lock_release(&h->busy);
    return err;
}

VixError VixDiskLib_Read(struct Handle *h, uint64_t start, uint64_t n, uint8_t *buf) { return do_read(h, start, n, buf); }

VixError VixDiskLib_ReadAsync(struct Handle *h, uint64_t start, uint64_t n, uint8_t *buf, VixDiskLibCompletionCB cb,
                              void *data) {
    /* Completes at once, from the calling thread, as the real library may. */
    event("ReadAsync %llu %llu", (unsigned long long)start, (unsigned long long)n);
    VixError e = do_read(h, start, n, buf);
    cb(data, e);
    return VIX_ASYNC;
}

VixError VixDiskLib_Wait(struct Handle *h) { return h ? VIX_OK : VIX_E_INVALID_ARG; }

VixError VixDiskLib_Write(struct Handle *h, uint64_t start, uint64_t n, const uint8_t *buf) {
    if (!initialized) return VIX_E_DISK_NOINIT;
    if (!h || !buf) return VIX_E_INVALID_ARG;
    if (h->read_only) {
        event("VIOLATION Write on a read-only handle");
        return VIX_E_FILE_READ_ONLY;
    }
    if (n == 0 || start + n > h->sectors) return VIX_E_DISK_OUTOFRANGE;
    if (__sync_lock_test_and_set(&h->busy, 1)) {
        event("VIOLATION concurrent I/O on one handle");
        return VIX_E_OBJECT_IS_BUSY;
    }
    int r = disk_io(h, 1, start, n, (uint8_t *)buf);
    __sync_lock_release(&h->busy);
    event("Write %llu %llu", (unsigned long long)start, (unsigned long long)n);
    return r == 0 ? VIX_OK : VIX_E_FILE_ERROR;
}

VixError VixDiskLib_Flush(struct Handle *h) { return h && fsync(h->fd) == 0 ? VIX_OK : VIX_E_FILE_ERROR; }

VixError VixDiskLib_QueryAllocatedBlocks(struct Handle *h, uint64_t start, uint64_t n, uint64_t chunk,
                                         VixDiskLibBlockList **out) {
    if (!initialized) return VIX_E_DISK_NOINIT;
    if (!h || !out) return VIX_E_INVALID_ARG;
    check_open_close_thread("QueryAllocatedBlocks");
    if (chunk < 128 || start % chunk != 0 || n % chunk != 0 || n / chunk > 512 * 1024 || start + n > h->sectors) {
        event("QueryAllocatedBlocks refused: start %llu n %llu chunk %llu", (unsigned long long)start,
              (unsigned long long)n, (unsigned long long)chunk);
        return VIX_E_INVALID_ARG;
    }
    /* Allocated = chunks the sparse file has data in (SEEK_DATA), as a thin disk's grain map would say. */
    uint32_t cap = 16, count = 0;
    VixDiskLibBlockList *list = malloc(sizeof(VixDiskLibBlockList) + cap * sizeof(VixDiskLibBlock));
    off_t end = (off_t)((start + n) * 512);
    off_t pos = (off_t)(start * 512);
    while (pos < end) {
        off_t data = lseek(h->fd, pos, SEEK_DATA);
        if (data < 0 || data >= end) break;
        off_t hole = lseek(h->fd, data, SEEK_HOLE);
        if (hole < 0 || hole > end) hole = end;
        uint64_t cs = chunk * 512;
        uint64_t a = (uint64_t)data / cs * cs, b = ((uint64_t)hole + cs - 1) / cs * cs;
        if (b > (uint64_t)end) b = (uint64_t)end;
        if (count > 0 && list->blocks[count - 1].offset + list->blocks[count - 1].length >= a / 512) {
            list->blocks[count - 1].length = b / 512 - list->blocks[count - 1].offset;
        } else {
            if (count == cap) {
                cap *= 2;
                list = realloc(list, sizeof(VixDiskLibBlockList) + cap * sizeof(VixDiskLibBlock));
            }
            list->blocks[count].offset = a / 512;
            list->blocks[count].length = (b - a) / 512;
            count++;
        }
        pos = (off_t)b;
    }
    /* Answers a real library should not give, to test that they are handled: the list backwards with the first
     * block repeated (unsorted, overlapping), or a block whose byte offset overflows 64 bits. */
    const char *odd = getenv("FAKE_VDDK_ALLOCATED_ANSWER");
    if (odd && count > 0) {
        list = realloc(list, sizeof(VixDiskLibBlockList) + (count + 1) * sizeof(VixDiskLibBlock));
        if (strcmp(odd, "reversed") == 0) {
            for (uint32_t i = 0; i < count / 2; i++) {
                VixDiskLibBlock t = list->blocks[i];
                list->blocks[i] = list->blocks[count - 1 - i];
                list->blocks[count - 1 - i] = t;
            }
            list->blocks[count] = list->blocks[count - 1];
            count++;
        } else if (strcmp(odd, "beyond") == 0) {
            list->blocks[count].offset = 1ULL << 60;
            list->blocks[count].length = chunk;
            count++;
        }
    }
    list->numBlocks = count;
    event("QueryAllocatedBlocks %llu %llu %llu -> %u", (unsigned long long)start, (unsigned long long)n,
          (unsigned long long)chunk, count);
    *out = list;
    return VIX_OK;
}

VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *l) {
    free(l);
    return VIX_OK;
}

char *VixDiskLib_GetErrorText(VixError err, const char *locale) {
    (void)locale;
    const char *t;
    switch (err & 0xFFFF) {
    case VIX_OK: t = "The operation was successful"; break;
    case VIX_E_FAIL: t = "Unknown error"; break;
    case VIX_E_INVALID_ARG: t = "One of the parameters was invalid"; break;
    case VIX_E_FILE_NOT_FOUND: t = "The system cannot find the file specified"; break;
    case VIX_E_OBJECT_IS_BUSY: t = "The object is busy"; break;
    case VIX_E_NOT_SUPPORTED: t = "The operation is not supported"; break;
    case VIX_E_FILE_ERROR: t = "A file access error occurred on the host or guest operating system"; break;
    case VIX_E_FILE_READ_ONLY: t = "The file is write-protected"; break;
    case VIX_E_FILE_ALREADY_EXISTS: t = "The file already exists"; break;
    case VIX_E_AUTHENTICATION_FAIL: t = "Authentication failure"; break;
    case VIX_E_DISK_NOINIT: t = "The disk library has not been initialized"; break;
    case VIX_E_DISK_NOIO: t = "The called function requires the virtual disk to be opened for I/O"; break;
    case VIX_E_DISK_OUTOFRANGE: t = "The requested sectors are out of range"; break;
    case VIX_E_CANNOT_CONNECT_TO_HOST: t = "Cannot connect to host"; break;
    default: t = "Unknown error"; break;
    }
    return strdup(t);
}

void VixDiskLib_FreeErrorText(char *t) { free(t); }
