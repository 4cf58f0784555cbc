/*
** ep_launch.c — launching NCCL EP groups without the caller writing any bootstrap code: the
** launch environment (torchrun, Open MPI, MPICH), the unique-id file that stands in for a TCP
** store, the env-driven creation, and one process driving every local GPU (a thread per GPU).
** Plain C with no CUDA or NCCL headers, so all of it but the final creation runs in CPU CI
** (tests/test_launch.c); the NCCL calls are epmoe_nccl_unique_id and epmoe__ep_create_nccl_rank_wait.
*/
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ep_internal.h"

/* ---- the launch environment ---------------------------------------------------------------- */

/* Rank, size and local rank as each launcher spells them, in the order they are tried. Slurm
** is left out on purpose: SLURM_PROCID/SLURM_NTASKS are also set in a batch script's single
** process, which would then wait for ranks that never start. */
static const struct {
    const char *rank, *size, *local;
} launch_vars[] = {
    {"RANK", "WORLD_SIZE", "LOCAL_RANK"},                                             /* torchrun */
    {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},   /* Open MPI */
    {"PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"},                                      /* MPICH (hydra) */
};

static epmoe_status env_int(const char *name, const char *v, int *out) {
    char *end;
    errno = 0;
    const long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < 0 || x > INT_MAX)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "epmoe_launch_env: %s=\"%s\" is not a non-negative integer", name, v);
    *out = (int)x;
    return EPMOE_OK;
}

epmoe_status epmoe_launch_env(int *rank, int *size, int *local_rank) {
    if (!rank || !size || !local_rank) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "epmoe_launch_env: NULL argument");
    for (size_t i = 0; i < sizeof launch_vars / sizeof launch_vars[0]; i++) {
        const char *r = getenv(launch_vars[i].rank), *s = getenv(launch_vars[i].size), *l = getenv(launch_vars[i].local);
        if (!r && !s) continue;
        if (!r || !s)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "epmoe_launch_env: %s is set but %s is not", r ? launch_vars[i].rank
                               : launch_vars[i].size, r ? launch_vars[i].size : launch_vars[i].rank);
        int rk, sz, lr;
        EPMOE_CHECK(env_int(launch_vars[i].rank, r, &rk));
        EPMOE_CHECK(env_int(launch_vars[i].size, s, &sz));
        if (sz < 1 || rk >= sz)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "epmoe_launch_env: %s=%d is not a rank of %s=%d", launch_vars[i].rank,
                               rk, launch_vars[i].size, sz);
        lr = rk; /* one node: the local rank is the rank */
        if (l) EPMOE_CHECK(env_int(launch_vars[i].local, l, &lr));
        if (lr >= sz) /* a node's ranks are some of the world's */
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "epmoe_launch_env: %s=%d is not below %s=%d", launch_vars[i].local,
                               lr, launch_vars[i].size, sz);
        *rank = rk, *size = sz, *local_rank = lr;
        return EPMOE_OK;
    }
    *rank = 0, *size = 1, *local_rank = 0;
    return EPMOE_OK;
}

/* ---- the unique-id file ---------------------------------------------------------------------
** "epmoe-bootstrap 1 ranks <R>\n" then the 128 id bytes. Rank 0 writes a private temporary file
** and link()s it to the path, which is atomic and fails if the path exists, so a reader never
** sees half a file and a stale file from an earlier job is refused rather than overwritten
** while other ranks may already have read it. The rank count catches most stale files on the
** readers' side too. */
#define BOOT_MAGIC "epmoe-bootstrap 1 ranks "

epmoe_status epmoe__bootstrap_publish(const char *path, const void *id, int size) {
    char tmp[PATH_MAX], head[64];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "EPMOE_BOOTSTRAP_FILE: path too long");
    const int hn = snprintf(head, sizeof head, BOOT_MAGIC "%d\n", size);
    const int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "EPMOE_BOOTSTRAP_FILE: cannot create %s: %s", tmp, strerror(errno));
    const int ok = write(fd, head, (size_t)hn) == hn &&
                   write(fd, id, EPMOE_NCCL_UNIQUE_ID_BYTES) == EPMOE_NCCL_UNIQUE_ID_BYTES;
    const int err = errno;
    close(fd);
    if (!ok) {
        unlink(tmp);
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "EPMOE_BOOTSTRAP_FILE: cannot write %s: %s", tmp, strerror(err));
    }
    int rc = link(tmp, path), lerr = errno;
    if (rc != 0 && lerr != EEXIST) { /* a filesystem without hard links: rename is atomic too */
        struct stat sb;
        if (stat(path, &sb) == 0) lerr = EEXIST;
        else if ((rc = rename(tmp, path)) != 0) lerr = errno;
    }
    unlink(tmp);
    if (rc == 0) return EPMOE_OK;
    if (lerr == EEXIST)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "EPMOE_BOOTSTRAP_FILE %s already exists (left by an earlier job?): delete "
                           "it, or give each job a fresh path", path);
    return epmoe__fail(EPMOE_ERR_INVALID_ARG, "EPMOE_BOOTSTRAP_FILE: cannot create %s: %s", path, strerror(lerr));
}

epmoe_status epmoe__bootstrap_fetch(const char *path, void *id, int size, int timeout_ms) {
    const double deadline = epmoe__now_ms() + timeout_ms;
    uint8_t buf[64 + EPMOE_NCCL_UNIQUE_ID_BYTES];
    for (;;) {
        const int fd = open(path, O_RDONLY);
        if (fd >= 0) {
            size_t n = 0;
            ssize_t got;
            while (n < sizeof buf && (got = read(fd, buf + n, sizeof buf - n)) > 0) n += (size_t)got;
            close(fd);
            char *nl = memchr(buf, '\n', n < 64 ? n : 64), line[65] = {0};
            if (nl) memcpy(line, buf, (size_t)(nl - (char *)buf)); /* the text line alone, terminated: sscanf runs strlen */
            int ranks = -1;
            if (!nl || strncmp(line, BOOT_MAGIC, sizeof BOOT_MAGIC - 1) || sscanf(line + sizeof BOOT_MAGIC - 1, "%d", &ranks) != 1 ||
                n != (size_t)(nl + 1 - (char *)buf) + EPMOE_NCCL_UNIQUE_ID_BYTES)
                return epmoe__fail(EPMOE_ERR_INVALID_ARG, "EPMOE_BOOTSTRAP_FILE %s is not an epmoe bootstrap file", path);
            if (ranks != size)
                return epmoe__fail(EPMOE_ERR_INVALID_ARG, "EPMOE_BOOTSTRAP_FILE %s is for %d ranks, this launch has %d (a "
                                   "stale file from another job?)", path, ranks, size);
            memcpy(id, nl + 1, EPMOE_NCCL_UNIQUE_ID_BYTES);
            return EPMOE_OK;
        }
        if (errno != ENOENT)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "EPMOE_BOOTSTRAP_FILE: cannot open %s: %s", path, strerror(errno));
        if (epmoe__now_ms() > deadline)
            return epmoe__fail(EPMOE_ERR_TIMEOUT, "EPMOE_BOOTSTRAP_FILE: no %s after %d ms (has rank 0 started, and does it "
                               "see the same path?)", path, timeout_ms);
        const struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* ---- creation ------------------------------------------------------------------------------- */

epmoe_status epmoe__ep_rank_args(const char *fn, const epmoe_ep_config *in, int rank, int size, const void *unique_id,
                                 epmoe_ep **ep, epmoe_ep_config *cfg) {
    if (!unique_id || !ep) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: unique_id and ep must not be NULL", fn);
    return epmoe__ep_config_as(fn, in, rank, size, cfg); /* e.g. num_experts must divide by size */
}

/* How long a launched rank waits for the others (the unique-id file, the communicator): processes
** start slowly (an interpreter, a framework's imports, a model's load), so at least 120 s. */
static int slow_start_ms(const epmoe_ep_config *cfg) { return cfg->timeout_ms > 120000 ? cfg->timeout_ms : 120000; }

epmoe_status epmoe_ep_create_nccl_rank(const epmoe_ep_config *cfg, int rank, int size, const void *unique_id, int device,
                                       epmoe_ep **ep) {
    return epmoe__ep_create_nccl_rank_wait(cfg, rank, size, unique_id, device, cfg ? slow_start_ms(cfg) : 0, ep);
}

epmoe_status epmoe_ep_create_nccl_env(const epmoe_ep_config *cfg, epmoe_ep **ep) {
    static const char fn[] = "epmoe_ep_create_nccl_env";
    static atomic_int calls; /* the i-th call of a process uses the i-th file: calls are collective */
    if (!cfg || !ep) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: cfg and ep must not be NULL", fn);
    int rank, size, local;
    EPMOE_CHECK(epmoe_launch_env(&rank, &size, &local));
    { /* the config as this rank will hold it, before a file is written or awaited */
        epmoe_ep_config c;
        EPMOE_CHECK(epmoe__ep_config_as(fn, cfg, rank, size, &c));
    }
#if !EPMOE_HAVE_NCCL
    /* before the bootstrap: rank 0 fails so too and never writes the file the others would await */
    return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: this libepmoe was built without the NCCL backend", fn);
#endif
    const char *file = getenv("EPMOE_BOOTSTRAP_FILE");
    if (!(file && *file) && size > 1 && !getenv("NCCL_COMM_ID"))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: rank %d of %d: set EPMOE_BOOTSTRAP_FILE to a fresh path every rank can "
                           "see (tools/epmoe-launch does), or NCCL_COMM_ID=<host>:<port>", fn, rank, size);
    uint8_t id[EPMOE_NCCL_UNIQUE_ID_BYTES];
    char path[PATH_MAX];
    path[0] = 0;
    if (file && *file) {
        const int call = atomic_fetch_add(&calls, 1);
        const int n = call ? snprintf(path, sizeof path, "%s.%d", file, call) : snprintf(path, sizeof path, "%s", file);
        if (n >= (int)sizeof path) return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: EPMOE_BOOTSTRAP_FILE is too long", fn);
        if (rank == 0) {
            EPMOE_CHECK(epmoe_nccl_unique_id(id));
            EPMOE_CHECK(epmoe__bootstrap_publish(path, id, size));
        } else {
            EPMOE_CHECK(epmoe__bootstrap_fetch(path, id, size, slow_start_ms(cfg)));
        }
    } else { /* one rank, or NCCL_COMM_ID: NCCL builds the same id on every rank from the address */
        EPMOE_CHECK(epmoe_nccl_unique_id(id));
    }
    const epmoe_status st = epmoe_ep_create_nccl_rank(cfg, rank, size, id, local, ep);
    /* Initialization is collective, so every rank has read the file once it returns; remove
    ** the file on failure too, so that it cannot mislead the next job. */
    if (path[0] && rank == 0) unlink(path);
    return st;
}

typedef struct {
    const epmoe_ep_config *cfg;
    int rank, size, device;
    const uint8_t *id;
    epmoe_ep *ep;
    epmoe_status st;
    char err[512]; /* epmoe_last_error() is per thread: carried back to the caller's */
} local_job;

static void *local_create(void *arg) {
    local_job *j = arg;
    j->st = epmoe_ep_create_nccl_rank(j->cfg, j->rank, j->size, j->id, j->device, &j->ep);
    if (j->st != EPMOE_OK) snprintf(j->err, sizeof j->err, "%s", epmoe_last_error());
    return NULL;
}

static void *local_destroy(void *arg) {
    local_job *j = arg;
    epmoe_ep_destroy(j->ep); /* collective: each rank's teardown from its own thread */
    return NULL;
}

/* Run fn on every job, a thread each: a rank's collective calls block until the others join.
** 0 if not every thread started: those that did may wait forever for the missing ranks, so
** they are detached, not joined, and the caller must leak `jobs` (they still use it). */
static int on_threads(local_job *jobs, int n, void *(*fn)(void *)) {
    pthread_t *th = malloc(sizeof *th * (size_t)n);
    if (!th) return 0;
    int started = 0;
    while (started < n && pthread_create(&th[started], NULL, fn, &jobs[started]) == 0) started++;
    for (int i = 0; i < started; i++) {
        if (started == n) pthread_join(th[i], NULL);
        else pthread_detach(th[i]);
    }
    free(th);
    return started == n;
}

epmoe_status epmoe_ep_create_nccl_local(const epmoe_ep_config *cfg, int num_gpus, const int *devices, epmoe_ep **eps) {
    static const char fn[] = "epmoe_ep_create_nccl_local";
    if (!eps) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: eps is NULL", fn);
    if (num_gpus < 1 || num_gpus > 1024) return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: num_gpus = %d", fn, num_gpus);
    uint8_t id[EPMOE_NCCL_UNIQUE_ID_BYTES];
    { /* the whole config, with its final size, must be valid before any thread starts */
        epmoe_ep_config c;
        epmoe_ep *unused;
        EPMOE_CHECK(epmoe__ep_rank_args(fn, cfg, 0, num_gpus, id, &unused, &c));
    }
    EPMOE_CHECK(epmoe_nccl_unique_id(id));
    local_job *jobs = calloc((size_t)num_gpus, sizeof *jobs);
    if (!jobs) return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: out of memory", fn);
    for (int i = 0; i < num_gpus; i++) {
        jobs[i].cfg = cfg, jobs[i].rank = i, jobs[i].size = num_gpus, jobs[i].device = devices ? devices[i] : i;
        jobs[i].id = id;
    }
    if (!on_threads(jobs, num_gpus, local_create)) /* jobs leaked: detached threads use it */
        return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: cannot start a thread per GPU", fn);
    int bad = -1;
    for (int i = 0; i < num_gpus && bad < 0; i++)
        if (jobs[i].st != EPMOE_OK) bad = i;
    if (bad < 0) {
        for (int i = 0; i < num_gpus; i++) eps[i] = jobs[i].ep;
        free(jobs);
        return EPMOE_OK;
    }
    const epmoe_status st = epmoe__fail(jobs[bad].st, "%s: rank %d (device %d): %s", fn, bad, jobs[bad].device, jobs[bad].err);
    for (int i = 0; i < num_gpus; i++)
        if (jobs[i].st != EPMOE_OK) jobs[i].ep = NULL; /* epmoe_ep_destroy(NULL) does nothing */
    if (on_threads(jobs, num_gpus, local_destroy)) free(jobs);
    return st;
}
