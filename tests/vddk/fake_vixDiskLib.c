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

struct Connection { char *snapshot; char *transport; };
struct Handle {
    int fd;
    uint64_t sectors;
    int read_only;
    volatile int busy; /* I/O in progress: a second concurrent call is a violation */
    char *path;
};

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
    if (prepared != 0) event("VIOLATION Exit with %d PrepareForAccess not ended", prepared);
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
    if (prepared <= 0) event("VIOLATION EndAccess without PrepareForAccess");
    prepared--;
    event("EndAccess %s", p && p->vmxSpec ? p->vmxSpec : "?");
    return VIX_OK;
}

VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *p, Bool readOnly, const char *snapshotRef,
                              const char *transportModes, struct Connection **out) {
    if (!initialized) return VIX_E_DISK_NOINIT;
    if (!p || !out || !p->serverName) return VIX_E_INVALID_ARG;
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

VixError VixDiskLib_Open(const struct Connection *c, const char *path, uint32_t flags, struct Handle **out) {
    if (!initialized) return VIX_E_DISK_NOINIT;
    if (!c || !path || !out) return VIX_E_INVALID_ARG;
    check_open_close_thread("Open");
    char *file = resolve(path, c->snapshot);
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
    free(h);
    return VIX_OK;
}

const char *VixDiskLib_GetTransportMode(struct Handle *h) { (void)h; return "nbdssl"; }

VixError VixDiskLib_GetInfo(struct Handle *h, VixDiskLibInfo **out) {
    if (!h || !out) return VIX_E_INVALID_ARG;
    VixDiskLibInfo *i = calloc(1, sizeof *i);
    i->capacity = h->sectors;
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
        size_t len = (size_t)n * 512, done = 0;
        while (done < len) {
            ssize_t r = pread(h->fd, buf + done, len - done, (off_t)(start * 512 + done));
            if (r <= 0) { err = VIX_E_FILE_ERROR; break; }
            done += (size_t)r;
        }
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
    ssize_t w = pwrite(h->fd, buf, (size_t)n * 512, (off_t)(start * 512));
    __sync_lock_release(&h->busy);
    event("Write %llu %llu", (unsigned long long)start, (unsigned long long)n);
    return w == (ssize_t)(n * 512) ? VIX_OK : VIX_E_FILE_ERROR;
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
