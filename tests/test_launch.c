/*
** test_launch.c — the parts of launching and of the fallback transport that run without a GPU:
** the launch environment (torchrun, Open MPI, MPICH variables), the unique-id file (ranks as
** threads; stale, foreign and missing files), the checks the creation helpers make before they
** touch NCCL, the transport selection (config field, EPMOE_EP_TRANSPORT, a config of the
** earlier, shorter size) and the padded all-to-all's buffers in the layout query. The GPU side
** is tests/gpu/test_ep_gpu.c (--transport alltoall, --local, --launched).
*/
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <pthread.h>
#include <stddef.h>
#include <time.h>
#include <unistd.h>

#include "test.h"
#include "ep/ep_internal.h"

static const char *launch_names[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                     "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
                                     "EPMOE_BOOTSTRAP_FILE", "NCCL_COMM_ID", "EPMOE_EP_TRANSPORT"};

static void clear_env(void) {
    for (size_t i = 0; i < sizeof launch_names / sizeof launch_names[0]; i++) unsetenv(launch_names[i]);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* epmoe_launch_env must give (rank, size, local), or fail naming `bad` */
static void env_case(const char *what, int want_rank, int want_size, int want_local, const char *bad) {
    int r = -9, s = -9, l = -9;
    epmoe_status st = epmoe_launch_env(&r, &s, &l);
    if (bad) {
        CHECK(st == EPMOE_ERR_INVALID_ARG && strstr(epmoe_last_error(), bad), "%s: status %d, message \"%s\" should name %s",
              what, st, epmoe_last_error(), bad);
        return;
    }
    CHECK(st == EPMOE_OK && r == want_rank && s == want_size && l == want_local,
          "%s: status %d, rank %d size %d local %d; want %d %d %d (%s)", what, st, r, s, l, want_rank, want_size, want_local,
          epmoe_last_error());
}

static void test_env(void) {
    clear_env();
    env_case("nothing set: one rank", 0, 1, 0, NULL);
    setenv("RANK", "1", 1), setenv("WORLD_SIZE", "4", 1), setenv("LOCAL_RANK", "1", 1);
    env_case("torchrun", 1, 4, 1, NULL);
    unsetenv("LOCAL_RANK");
    setenv("RANK", "3", 1);
    env_case("torchrun without LOCAL_RANK: one node", 3, 4, 3, NULL);
    setenv("OMPI_COMM_WORLD_RANK", "0", 1), setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
    env_case("torchrun's variables come first", 3, 4, 3, NULL);
    setenv("RANK", "4", 1);
    env_case("rank == size", 0, 0, 0, "RANK=4");
    setenv("RANK", "x1", 1);
    env_case("not a number", 0, 0, 0, "RANK");
    setenv("RANK", "1 ", 1);
    env_case("trailing space", 0, 0, 0, "RANK");
    setenv("RANK", "-1", 1);
    env_case("negative", 0, 0, 0, "RANK");
    setenv("RANK", "99999999999", 1);
    env_case("too large", 0, 0, 0, "RANK");
    setenv("RANK", "0", 1), setenv("WORLD_SIZE", "0", 1);
    env_case("size 0", 0, 0, 0, "WORLD_SIZE");
    unsetenv("WORLD_SIZE");
    env_case("rank without size", 0, 0, 0, "WORLD_SIZE");
    clear_env();
    setenv("WORLD_SIZE", "2", 1);
    env_case("size without rank", 0, 0, 0, "RANK");
    clear_env();
    setenv("OMPI_COMM_WORLD_RANK", "5", 1), setenv("OMPI_COMM_WORLD_SIZE", "8", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
    env_case("Open MPI", 5, 8, 1, NULL);
    clear_env();
    setenv("PMI_RANK", "2", 1), setenv("PMI_SIZE", "3", 1), setenv("MPI_LOCALRANKID", "0", 1);
    env_case("MPICH", 2, 3, 0, NULL);
    setenv("MPI_LOCALRANKID", "a", 1);
    env_case("bad local rank", 0, 0, 0, "MPI_LOCALRANKID");
    setenv("MPI_LOCALRANKID", "3", 1);
    env_case("local rank == size", 0, 0, 0, "MPI_LOCALRANKID=3");
    clear_env();
    int r;
    CHECK_STATUS(epmoe_launch_env(&r, NULL, &r), EPMOE_ERR_NULL_POINTER);
}

/* ---- the unique-id file: rank 0 publishes late, the others poll ---------------------------- */
typedef struct {
    const char *path;
    int rank, size, delay_ms;
    uint8_t id[EPMOE_NCCL_UNIQUE_ID_BYTES];
    epmoe_status st;
} boot_job;

static void *boot_rank(void *arg) {
    boot_job *j = arg;
    if (j->rank == 0) {
        struct timespec ts = {0, j->delay_ms * 1000000L};
        nanosleep(&ts, NULL);
        j->st = epmoe__bootstrap_publish(j->path, j->id, j->size);
    } else {
        j->st = epmoe__bootstrap_fetch(j->path, j->id, j->size, 5000);
    }
    return NULL;
}

static int count_entries(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));) n += e->d_name[0] != '.';
    if (d) closedir(d);
    return n;
}

static void write_file(const char *path, const void *bytes, size_t n) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "cannot write %s", path);
    if (f) fwrite(bytes, 1, n, f), fclose(f);
}

static void test_bootstrap_file(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/id", dir);
    boot_job jobs[4];
    pthread_t th[4];
    for (int r = 0; r < 4; r++) {
        memset(&jobs[r], 0, sizeof jobs[r]);
        jobs[r].path = path, jobs[r].rank = r, jobs[r].size = 4, jobs[r].delay_ms = 60;
        if (r == 0)
            for (int b = 0; b < EPMOE_NCCL_UNIQUE_ID_BYTES; b++) jobs[0].id[b] = (uint8_t)(b * 7 + 3); /* '\n' bytes too */
        pthread_create(&th[r], NULL, boot_rank, &jobs[r]);
    }
    for (int r = 0; r < 4; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < 4; r++)
        CHECK(jobs[r].st == EPMOE_OK && !memcmp(jobs[r].id, jobs[0].id, sizeof jobs[0].id), "bootstrap rank %d: status %d",
              r, jobs[r].st);
    CHECK(count_entries(dir) == 1, "publish leaves only the file (found %d entries)", count_entries(dir));
    /* a second job on the same path: refused, the old file untouched */
    uint8_t id[EPMOE_NCCL_UNIQUE_ID_BYTES] = {1}, got[EPMOE_NCCL_UNIQUE_ID_BYTES];
    CHECK_STATUS(epmoe__bootstrap_publish(path, id, 4), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "already exists") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe__bootstrap_fetch(path, got, 4, 100), EPMOE_OK);
    CHECK(!memcmp(got, jobs[0].id, sizeof got), "the existing file was overwritten");
    CHECK(count_entries(dir) == 1, "a refused publish leaves no temporary file (found %d entries)", count_entries(dir));
    /* a file for another world size (a stale one from another job) */
    CHECK_STATUS(epmoe__bootstrap_fetch(path, got, 2, 100), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "is for 4 ranks") != NULL, "message: %s", epmoe_last_error());
    /* not ours, or cut short */
    char junk[512];
    snprintf(junk, sizeof junk, "%s/junk", dir);
    write_file(junk, "hello\n", 6);
    CHECK_STATUS(epmoe__bootstrap_fetch(junk, got, 2, 100), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "not an epmoe bootstrap file") != NULL, "message: %s", epmoe_last_error());
    write_file(junk, "epmoe-bootstrap 1 ranks 2\nshort", 31);
    CHECK_STATUS(epmoe__bootstrap_fetch(junk, got, 2, 100), EPMOE_ERR_INVALID_ARG);
    /* an empty count, then digits to the end of what is read and no zero byte: the count is parsed
    ** from the first line alone (sscanf had run on past the read buffer: ASan) */
    char digits[64 + EPMOE_NCCL_UNIQUE_ID_BYTES];
    memcpy(digits, "epmoe-bootstrap 1 ranks \n", 25);
    memset(digits + 25, '7', sizeof digits - 25);
    write_file(junk, digits, sizeof digits);
    CHECK_STATUS(epmoe__bootstrap_fetch(junk, got, 2, 100), EPMOE_ERR_INVALID_ARG);
    unlink(junk);
    /* rank 0 never comes */
    char missing[512];
    snprintf(missing, sizeof missing, "%s/never", dir);
    const double t0 = now_ms();
    CHECK_STATUS(epmoe__bootstrap_fetch(missing, got, 2, 120), EPMOE_ERR_TIMEOUT);
    const double waited = now_ms() - t0;
    CHECK(waited >= 110 && waited < 3000, "gave up after %.0f ms (timeout 120)", waited);
    snprintf(missing, sizeof missing, "%s/no/such/dir/id", dir);
    CHECK_STATUS(epmoe__bootstrap_publish(missing, id, 2), EPMOE_ERR_INVALID_ARG);
    unlink(path);
}

/* ---- the creation helpers refuse bad arguments before touching NCCL or a GPU ---------------- */
static void test_create_checks(const char *dir) {
    clear_env();
    epmoe_ep_config c = EPMOE_EP_CONFIG_INIT; /* 256 experts */
    uint8_t id[EPMOE_NCCL_UNIQUE_ID_BYTES] = {0};
    epmoe_ep *ep = NULL, *eps[4];
    CHECK_STATUS(epmoe_ep_create_nccl_rank(NULL, 0, 1, id, 0, &ep), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_create_nccl_rank(&c, 0, 1, NULL, 0, &ep), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_create_nccl_rank(&c, 0, 1, id, 0, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_create_nccl_rank(&c, 2, 2, id, 0, &ep), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_ep_create_nccl_rank(&c, 0, 0, id, 0, &ep), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_ep_create_nccl_rank(&c, 0, 3, id, 0, &ep), EPMOE_ERR_INVALID_ARG); /* 256 experts over 3 */
    CHECK(strstr(epmoe_last_error(), "num_experts") != NULL, "message: %s", epmoe_last_error());
    epmoe_ep_config b = c;
    b.size = 12;
    CHECK_STATUS(epmoe_ep_create_nccl_rank(&b, 0, 1, id, 0, &ep), EPMOE_ERR_INVALID_ARG);
    /* the caller's own rank and num_ranks are replaced, never read (epmoe.h): a config made for
    ** another world is fine, and the result holds the given rank and size */
    epmoe_ep_config other = c, got;
    other.rank = 3, other.num_ranks = 1;
    CHECK_STATUS(epmoe__ep_rank_args("t", &other, 1, 2, id, &ep, &got), EPMOE_OK);
    CHECK(got.rank == 1 && got.num_ranks == 2 && got.num_experts == c.num_experts, "rank %d of %d", got.rank, got.num_ranks);
    other.rank = 0, other.num_ranks = 512; /* 256 experts cannot split over 512 ranks, but over 2 they can */
    CHECK_STATUS(epmoe__ep_rank_args("t", &other, 0, 2, id, &ep, &got), EPMOE_OK);
    other.num_ranks = 0;
    CHECK_STATUS(epmoe__ep_rank_args("t", &other, 1, 4, id, &ep, &got), EPMOE_OK);
    CHECK_STATUS(epmoe__ep_rank_args("t", &other, 4, 4, id, &ep, &got), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe__ep_rank_args("t", NULL, 0, 1, id, &ep, &got), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_create_nccl_local(&c, 2, NULL, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_create_nccl_local(&c, 0, NULL, eps), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_ep_create_nccl_local(&c, 3, NULL, eps), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_ep_create_nccl_env(&c, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_create_nccl_env(NULL, &ep), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_nccl_unique_id(NULL), EPMOE_ERR_NULL_POINTER);

    uint8_t a[EPMOE_NCCL_UNIQUE_ID_BYTES], a2[EPMOE_NCCL_UNIQUE_ID_BYTES];
    const epmoe_status st = epmoe_nccl_unique_id(a);
    if (!EPMOE_HAVE_NCCL) {
        CHECK(st == EPMOE_ERR_UNSUPPORTED, "no NCCL: epmoe_nccl_unique_id gave %d", st);
    } else if (st == EPMOE_OK) { /* ncclGetUniqueId needs no GPU; two ids differ */
        CHECK_STATUS(epmoe_nccl_unique_id(a2), EPMOE_OK);
        CHECK(memcmp(a, a2, sizeof a) != 0, "two unique ids are equal");
    } else {
        CHECK(st == EPMOE_ERR_NCCL, "epmoe_nccl_unique_id gave %d", st);
        printf("  note: ncclGetUniqueId fails on this machine (%s)\n", epmoe_last_error());
    }

    /* the env-driven creation: a second rank needs a way to get rank 0's id */
    /* (without NCCL: UNSUPPORTED first, since no file would make it work) */
    const epmoe_status no_way = EPMOE_HAVE_NCCL ? EPMOE_ERR_INVALID_ARG : EPMOE_ERR_UNSUPPORTED;
    setenv("RANK", "1", 1), setenv("WORLD_SIZE", "2", 1);
    CHECK_STATUS(epmoe_ep_create_nccl_env(&c, &ep), no_way);
    CHECK(strstr(epmoe_last_error(), EPMOE_HAVE_NCCL ? "EPMOE_BOOTSTRAP_FILE" : "without the NCCL backend") != NULL,
          "message: %s", epmoe_last_error());
    epmoe_ep_config stale = c; /* its own rank and size are not read: the environment's are */
    stale.rank = 5, stale.num_ranks = 3;
    CHECK_STATUS(epmoe_ep_create_nccl_env(&stale, &ep), no_way);
    CHECK(strstr(epmoe_last_error(), EPMOE_HAVE_NCCL ? "EPMOE_BOOTSTRAP_FILE" : "without the NCCL backend") != NULL,
          "message: %s", epmoe_last_error());
    setenv("WORLD_SIZE", "3", 1); /* 256 experts over 3: refused before any file */
    CHECK_STATUS(epmoe_ep_create_nccl_env(&c, &ep), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "num_experts") != NULL, "message: %s", epmoe_last_error());
    /* the i-th call of a process reads "<path>.<i>": files for other world sizes stop it early */
    char file[512], file1[512], file2[512];
    snprintf(file, sizeof file, "%s/job", dir);
    snprintf(file1, sizeof file1, "%s/job.1", dir);
    snprintf(file2, sizeof file2, "%s/job.2", dir);
    setenv("EPMOE_BOOTSTRAP_FILE", file, 1);
    setenv("WORLD_SIZE", "2", 1);
    if (!EPMOE_HAVE_NCCL) { /* rank 1 must not wait for a file rank 0 (UNSUPPORTED too) never writes */
        const time_t t0 = time(NULL);
        CHECK_STATUS(epmoe_ep_create_nccl_env(&c, &ep), EPMOE_ERR_UNSUPPORTED);
        CHECK(time(NULL) - t0 < 5, "no NCCL: rank 1 waited %lld s for the bootstrap file", (long long)(time(NULL) - t0));
        clear_env();
        return;
    }
    CHECK_STATUS(epmoe__bootstrap_publish(file, id, 4), EPMOE_OK);
    CHECK_STATUS(epmoe__bootstrap_publish(file1, id, 3), EPMOE_OK);
    CHECK_STATUS(epmoe__bootstrap_publish(file2, id, 2), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_create_nccl_env(&c, &ep), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "is for 4 ranks") != NULL, "first call reads the path: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_ep_create_nccl_env(&c, &ep), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "is for 3 ranks") != NULL, "second call reads path.1: %s", epmoe_last_error());
    setenv("RANK", "0", 1); /* rank 0 of the third call makes an id, then finds path.2 already there */
    CHECK_STATUS(epmoe_ep_create_nccl_env(&c, &ep), st == EPMOE_OK ? EPMOE_ERR_INVALID_ARG : st);
    if (st == EPMOE_OK)
        CHECK(strstr(epmoe_last_error(), "already exists") != NULL, "rank 0 refuses a stale file: %s", epmoe_last_error());
    unlink(file), unlink(file1), unlink(file2);
    clear_env();
}

/* ---- the transport: selection, old configs, the fallback's footprint ------------------------- */

/* The padded all-to-all's buffer, computed here from its definition (ep_layout.h): per peer a
** dispatch slab (count block of 1 + L 8-byte words + every slot) and a combine slab; one outbox,
** two inboxes. */
static size_t a2a_bytes(const epmoe_ep_config *c, size_t msg_bytes) {
    const size_t R = (size_t)c->num_ranks, N = (size_t)c->max_tokens, k = (size_t)c->top_k, L = (size_t)(c->num_experts / c->num_ranks);
    const size_t slots = c->dedup ? N : N * (k < L ? k : L);
    const size_t meta = (8 * (1 + L) + 127) / 128 * 128, slab = (meta + slots * msg_bytes + 127) / 128 * 128;
    const size_t rows = c->combine_mode == EPMOE_COMBINE_REDUCE_AT_EXPERT ? N : N * k;
    const size_t comb = (rows * (size_t)c->hidden * 2 + 127) / 128 * 128;
    return 3 * R * slab + 3 * R * comb;
}

/* the put/signal transport's window: the device API's, then two parities of an outbox holding,
** per destination, its message slots, its count block and its combine rows (src/ep/ep_layout.h) */
static size_t al(size_t x, size_t a) { return (x + a - 1) / a * a; }
static size_t gin_bytes(const epmoe_ep_config *c, size_t dev_window, size_t msg_bytes) {
    const size_t R = (size_t)c->num_ranks, N = (size_t)c->max_tokens, k = (size_t)c->top_k, L = (size_t)(c->num_experts / c->num_ranks);
    const size_t slots = c->dedup ? N : N * (k < L ? k : L), meta = al(8 * (1 + L) + 8, 128);
    const size_t rows = c->combine_mode == EPMOE_COMBINE_REDUCE_AT_EXPERT ? N : N * k;
    return dev_window + 2 * al(R * slots * msg_bytes + R * meta + al(R * rows * (size_t)c->hidden * 2, 128), 4096);
}

static void test_transport(void) {
    clear_env();
    epmoe_ep_config c = EPMOE_EP_CONFIG_INIT;
    c.num_ranks = 2; /* DeepSeek-R1, EP2 */
    CHECK(c.transport == EPMOE_TRANSPORT_AUTO, "EPMOE_EP_CONFIG_INIT: transport %d", c.transport);
    epmoe_ep_layout dev, a2a, l;
    CHECK_STATUS(epmoe_ep_layout_query(&c, &dev), EPMOE_OK);
    c.transport = EPMOE_TRANSPORT_ALLTOALL;
    CHECK_STATUS(epmoe_ep_layout_query(&c, &a2a), EPMOE_OK);
    CHECK(a2a.window_bytes == a2a_bytes(&c, a2a.msg_bytes), "all-to-all buffer %zu, want %zu", a2a.window_bytes,
          a2a_bytes(&c, a2a.msg_bytes));
    CHECK(a2a.window_bytes != dev.window_bytes && a2a.recv_x_bytes == dev.recv_x_bytes && a2a.msg_bytes == dev.msg_bytes,
          "only the communication buffer differs");
    printf("  DeepSeek-R1 EP2 fp8: device-API window %.1f MB, all-to-all slabs %.1f MB\n", dev.window_bytes / 1e6,
           a2a.window_bytes / 1e6);
    const struct { int R, N, H, E, k, wire, dedup, mode; } shapes[] = {
        {1, 13, 384, 4, 4, EPMOE_WIRE_FP8, 1, EPMOE_COMBINE_REDUCE_AT_EXPERT},
        {4, 5, 128, 8, 2, EPMOE_WIRE_BF16, 0, EPMOE_COMBINE_REDUCE_AT_OWNER},
        {3, 7, 640, 6, 3, EPMOE_WIRE_FP8, 1, EPMOE_COMBINE_REDUCE_AT_OWNER},
        {8, 128, 7168, 256, 8, EPMOE_WIRE_BF16, 0, EPMOE_COMBINE_REDUCE_AT_OWNER},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        epmoe_ep_config s = c;
        s.num_ranks = shapes[i].R, s.max_tokens = shapes[i].N, s.hidden = shapes[i].H, s.num_experts = shapes[i].E;
        s.top_k = shapes[i].k, s.wire = (epmoe_wire)shapes[i].wire, s.dedup = shapes[i].dedup;
        s.combine_mode = (epmoe_combine_mode)shapes[i].mode;
        CHECK_STATUS(epmoe_ep_layout_query(&s, &l), EPMOE_OK);
        CHECK(l.window_bytes == a2a_bytes(&s, l.msg_bytes), "shape %zu: all-to-all buffer %zu, want %zu", i, l.window_bytes,
              a2a_bytes(&s, l.msg_bytes));
        epmoe_ep_layout ld, lg;
        s.transport = EPMOE_TRANSPORT_DEVICE;
        CHECK_STATUS(epmoe_ep_layout_query(&s, &ld), EPMOE_OK);
        s.transport = EPMOE_TRANSPORT_GIN_EMULATED;
        CHECK_STATUS(epmoe_ep_layout_query(&s, &lg), EPMOE_OK);
        CHECK(lg.window_bytes == gin_bytes(&s, ld.window_bytes, lg.msg_bytes), "shape %zu: put/signal window %zu, want %zu", i,
              lg.window_bytes, gin_bytes(&s, ld.window_bytes, lg.msg_bytes));
    }
    c.transport = EPMOE_TRANSPORT_GIN_EMULATED;
    CHECK_STATUS(epmoe_ep_layout_query(&c, &l), EPMOE_OK);
    printf("  DeepSeek-R1 EP2 fp8: put/signal (GIN's protocol) window with its outbox %.1f MB\n", l.window_bytes / 1e6);
    const size_t gin_window = l.window_bytes;

    /* the environment decides under AUTO only */
    c.transport = EPMOE_TRANSPORT_AUTO;
    setenv("EPMOE_EP_TRANSPORT", "alltoall", 1);
    CHECK_STATUS(epmoe_ep_layout_query(&c, &l), EPMOE_OK);
    CHECK(l.window_bytes == a2a.window_bytes, "AUTO + EPMOE_EP_TRANSPORT=alltoall reports the fallback");
    c.transport = EPMOE_TRANSPORT_DEVICE;
    CHECK_STATUS(epmoe_ep_layout_query(&c, &l), EPMOE_OK);
    CHECK(l.window_bytes == dev.window_bytes, "an explicit transport beats the environment");
    setenv("EPMOE_EP_TRANSPORT", "device", 1);
    c.transport = EPMOE_TRANSPORT_AUTO;
    CHECK_STATUS(epmoe_ep_layout_query(&c, &l), EPMOE_OK);
    CHECK(l.window_bytes == dev.window_bytes, "EPMOE_EP_TRANSPORT=device");
    setenv("EPMOE_EP_TRANSPORT", "gin-emulated", 1);
    CHECK_STATUS(epmoe_ep_layout_query(&c, &l), EPMOE_OK);
    CHECK(l.window_bytes == gin_window, "EPMOE_EP_TRANSPORT=gin-emulated");
    setenv("EPMOE_EP_TRANSPORT", "fast", 1);
    CHECK_STATUS(epmoe_ep_layout_query(&c, &l), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "EPMOE_EP_TRANSPORT=fast") != NULL, "message: %s", epmoe_last_error());
    setenv("EPMOE_EP_TRANSPORT", "", 1);
    CHECK_STATUS(epmoe_ep_layout_query(&c, &l), EPMOE_OK);
    clear_env();
    c.transport = EPMOE_TRANSPORT_GIN; /* the NIC protocol: the same window as its emulation */
    CHECK_STATUS(epmoe_ep_layout_query(&c, &l), EPMOE_OK);
    CHECK(l.window_bytes == gin_window, "transport gin: window %zu, want %zu", l.window_bytes, gin_window);
    c.transport = (epmoe_transport)5;
    CHECK_STATUS(epmoe_ep_layout_query(&c, &l), EPMOE_ERR_INVALID_ARG);

    /* A caller built against the header without `transport` passes the shorter size: it is read
    ** as AUTO and nothing past it is touched (the struct below ends there; ASan watches). */
    const size_t old_size = offsetof(epmoe_ep_config, transport);
    epmoe_ep_config small = EPMOE_EP_CONFIG_INIT;
    small.num_ranks = 1, small.max_tokens = 4, small.hidden = 128, small.num_experts = 4, small.top_k = 2;
    small.size = old_size;
    epmoe_ep_config *old = malloc(old_size);
    memcpy(old, &small, old_size);
    CHECK_STATUS(epmoe_ep_layout_query(old, &l), EPMOE_OK);
    small.size = sizeof small;
    CHECK_STATUS(epmoe_ep_layout_query(&small, &dev), EPMOE_OK);
    CHECK(l.window_bytes == dev.window_bytes, "an old-size config means AUTO");
    epmoe_cpu_world *w;
    epmoe_ep *ep;
    CHECK_STATUS(epmoe_cpu_world_create(1, &w), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_create_cpu(w, old, &ep), EPMOE_OK);
    uint16_t x[4 * 128] = {0}, eo[4 * 4 * 128] = {0}, out[4 * 128];
    int32_t idx[8] = {0, 1, 2, 3, 3, -1, 1, 1}, masked[4];
    float wt[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    uint8_t recv[4 * 4 * 128], scales[4 * 4 * 4];
    epmoe_dispatch_args a = {x, idx, 32, wt, 4, recv, scales, masked, NULL, NULL};
    uint32_t h;
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_OK);
    epmoe_combine_args ca = {eo, wt, out};
    CHECK_STATUS(epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_destroy(ep), EPMOE_OK);
    epmoe_cpu_world_destroy(w);
    const uint16_t *xs[1] = {x};
    const int32_t *ts[1] = {idx};
    const int Ts[1] = {4};
    void *rx[1] = {recv}, *rs[1] = {scales};
    int32_t *rm[1] = {masked};
    CHECK_STATUS(epmoe_ep_dispatch_ref(old, xs, ts, Ts, NULL, rx, rs, rm, NULL), EPMOE_OK);
    free(old);
}

/* ---- a failed group keeps answering with the status that failed it ----------------------- */
static void test_failed_status(void) {
    epmoe_cpu_world *w = NULL;
    CHECK_STATUS(epmoe_cpu_world_create(1, &w), EPMOE_OK);
    epmoe_ep_config c = EPMOE_EP_CONFIG_INIT;
    c.num_experts = 8, c.hidden = 128, c.max_tokens = 4, c.top_k = 2;
    const epmoe_status why[] = {EPMOE_ERR_NCCL, EPMOE_ERR_CUDA, EPMOE_ERR_TIMEOUT};
    for (int i = 0; i < 3; i++) {
        epmoe_ep *ep = NULL;
        CHECK_STATUS(epmoe_ep_create_cpu(w, &c, &ep), EPMOE_OK);
        if (!ep) continue;
        ep->failed = why[i]; /* as the NCCL backend marks it (ep_nccl.cu), here on the CPU backend */
        CHECK_STATUS(epmoe_ep_poll(ep), why[i]);
        CHECK(strstr(epmoe_last_error(), why[i] == EPMOE_ERR_TIMEOUT ? "a peer timed out" : "the transport failed") != NULL,
              "message: %s", epmoe_last_error());
        uint16_t x[4 * 128] = {0};
        int32_t ids[8] = {0, 1, 2, 3, 4, 5, 6, 7};
        float tw[8] = {0};
        epmoe_dispatch_args a = {x, ids, 32, tw, 4, NULL, NULL, NULL, NULL, NULL};
        uint32_t h;
        CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, NULL), why[i]); /* before any argument is read */
        CHECK_STATUS(epmoe_ep_destroy(ep), EPMOE_OK); /* failed before: torn down quietly */
    }
    epmoe_cpu_world_destroy(w);
}

int main(void) {
    char dir[] = "/tmp/epmoe-test-launch.XXXXXX";
    if (!mkdtemp(dir)) {
        printf("test_launch: cannot create a temporary directory\n");
        return 1;
    }
    test_env();
    test_bootstrap_file(dir);
    test_create_checks(dir);
    test_transport();
    test_failed_status();
    CHECK(count_entries(dir) == 0, "files left in %s", dir);
    rmdir(dir);
    return test_report("test_launch");
}
