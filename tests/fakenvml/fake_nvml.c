/* A stand-in libnvidia-ml.so.1 so the real pynvml ctypes path runs without a GPU.
 *
 * Two devices. GPU 0 is healthy: utilisation samples, memory v1 and v2, power,
 * an energy counter that grows 1 J per read, one compute process (pid from
 * $FAKE_NVML_PID, else the caller). GPU 1 answers "not supported" for energy and
 * "GPU is lost" for its process list. MIG is not supported on either.
 * Struct layouts are nvml.h's: nvmlProcessInfo_t (v2/v3) is 24 bytes.
 *
 * Scenario mode (a test's ground truth): once the caller sets the driver's clock
 * with fakeNvmlSetTime(us), GPU 0 runs the jobs given by fakeNvmlAddJob(start_us,
 * end_us, pid, util) (3 GiB each, fakeNvmlSetJobMemory(job, bytes) to change it):
 * its process list at time t is every job with start <= t < end (none: idle), and
 * nvmlDeviceGetSamples returns the driver's utilisation samples, six a second at
 * k * 1e6 / 6 us, each the utilisation of the period before it, [ts(k-1), ts(k)):
 * the running jobs' sum, at most 100, from a buffer of the last 20 s, as a real
 * driver keeps; nvmlDeviceGetProcessUtilization returns, per process that used the
 * GPU in the samples after lastSeenTimeStamp, its mean over those samples ("read
 * utilization since the previous query", NVML's documentation) and the latest
 * sample's timestamp; "not found" when no process used it;
 * fakeNvmlSetLost(1) makes GPU 0 "lost" until fakeNvmlSetLost(0); fakeNvmlResetEnergy()
 * sets GPU 0's energy counter back to zero, as a driver reload does.
 * Build: gcc -shared -fPIC -o libnvidia-ml.so.1 fake_nvml.c
 */
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/time.h>

typedef int nvmlReturn_t;
typedef struct fake_device *nvmlDevice_t;
struct fake_device { int index; };
static struct fake_device devices[2] = {{0}, {1}};
static unsigned long long energy_mj[2] = {5000000ULL, 0};

enum { OK = 0, UNINIT = 1, INVALID = 2, NOT_SUPPORTED = 3, NOT_FOUND = 6, INSUFFICIENT = 7, LOST = 15 };
static int initialised = 0;

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef union { double d; unsigned int ui; unsigned long ul; unsigned long long ull; long long sll; int si; unsigned short us; } nvmlValue_t;
typedef struct { unsigned long long timeStamp; nvmlValue_t sampleValue; } nvmlSample_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId, computeInstanceId; } nvmlProcessInfo_t;
typedef struct { unsigned int pid; unsigned long long timeStamp; unsigned int smUtil, memUtil, encUtil, decUtil; } nvmlProcessUtilizationSample_t;

_Static_assert(sizeof(nvmlProcessInfo_t) == 24, "nvmlProcessInfo_t must be 24 bytes");
_Static_assert(sizeof(nvmlSample_t) == 16, "nvmlSample_t must be 16 bytes");
_Static_assert(sizeof(nvmlProcessUtilizationSample_t) == 32, "nvmlProcessUtilizationSample_t must be 32 bytes");

#define CHECK_INIT if (!initialised) return UNINIT
#define CHECK_DEV(d) if ((d) != &devices[0] && (d) != &devices[1]) return INVALID

static int scenario = 0;
static unsigned long long virtual_us = 0;
struct job { unsigned long long start_us, end_us, memory; unsigned int pid, util; };
static struct job jobs[64];
static int njobs = 0;

static unsigned long long now_us(void) {
    if (scenario) return virtual_us;
    struct timeval tv; gettimeofday(&tv, NULL);
    return (unsigned long long)tv.tv_sec * 1000000ULL + tv.tv_usec;
}

/* Not NVML: the test's controls (scenario mode). */
void fakeNvmlSetTime(unsigned long long us) { scenario = 1; virtual_us = us; }
int fakeNvmlAddJob(unsigned long long start_us, unsigned long long end_us, unsigned int pid, unsigned int util) {
    if (njobs == 64) return -1;
    jobs[njobs].start_us = start_us; jobs[njobs].end_us = end_us; jobs[njobs].pid = pid; jobs[njobs].util = util;
    jobs[njobs].memory = 3ULL << 30;
    return njobs++;
}
int fakeNvmlSetJobMemory(int job, unsigned long long bytes) {
    if (job < 0 || job >= njobs) return -1;
    jobs[job].memory = bytes; return 0;
}
static int running(const struct job *j, unsigned long long t) { return j->start_us <= t && t < j->end_us; }
static unsigned int util_at(unsigned long long t) {  /* the GPU's: every running job's, at most 100 */
    unsigned int u = 0;
    for (int i = 0; i < njobs; i++) if (running(&jobs[i], t)) u += jobs[i].util;
    return u > 100 ? 100 : u;
}
static unsigned long long sample_ts(unsigned long long k) { return k * 1000000ULL / 6; }
static int gpu0_lost = 0;
void fakeNvmlSetLost(int lost) { gpu0_lost = lost; }  /* GPU 0's process list says "GPU is lost" */
void fakeNvmlResetEnergy(void) { energy_mj[0] = 0; }  /* the counter restarts, as after a driver reload */

const char *nvmlErrorString(nvmlReturn_t r) { (void)r; return "fake NVML error"; }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; initialised = 1; return OK; }
nvmlReturn_t nvmlInit_v2(void) { initialised = 1; return OK; }
nvmlReturn_t nvmlShutdown(void) { initialised = 0; return OK; }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) { CHECK_INIT; *count = 2; return OK; }
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) {
    CHECK_INIT; if (i > 1) return INVALID; *d = &devices[i]; return OK;
}
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *buf, unsigned int len) {
    CHECK_INIT; CHECK_DEV(d);
    snprintf(buf, len, "GPU-fake0000-0000-0000-0000-00000000000%d", d->index); return OK;
}
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *buf, unsigned int len) {
    CHECK_INIT; CHECK_DEV(d);
    snprintf(buf, len, "%s", d->index == 0 ? "NVIDIA H100 80GB HBM3" : "NVIDIA L40S"); return OK;
}
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *cur, unsigned int *pend) {
    (void)cur; (void)pend; CHECK_INIT; CHECK_DEV(d); return NOT_SUPPORTED;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    CHECK_INIT; CHECK_DEV(d);
    m->total = d->index == 0 ? 81559ULL << 20 : 46068ULL << 20; m->used = 1ULL << 30; m->free = m->total - m->used;
    return OK;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    CHECK_INIT; CHECK_DEV(d);
    if (m->version != 0x02000028) return INVALID;  /* nvmlMemory_v2: sizeof(struct) | 2 << 24 */
    m->total = d->index == 0 ? 81559ULL << 20 : 46068ULL << 20; m->reserved = 0;
    m->used = 2ULL << 30; m->free = m->total - m->used;
    return OK;
}
nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *mw) { CHECK_INIT; CHECK_DEV(d); *mw = 312000; return OK; }
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *mj) {
    CHECK_INIT; CHECK_DEV(d);
    if (d->index == 1) return NOT_SUPPORTED;
    energy_mj[0] += 1000; *mj = energy_mj[0]; return OK;
}
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    CHECK_INIT; CHECK_DEV(d); u->gpu = 33; u->memory = 10; return OK;
}
nvmlReturn_t nvmlDeviceGetSamples(nvmlDevice_t d, int type, unsigned long long last, int *vtype,
                                  unsigned int *count, nvmlSample_t *samples) {
    CHECK_INIT; CHECK_DEV(d);
    if (type != 1 || d->index == 1) return NOT_SUPPORTED;  /* GPU 1: falls back to the rate */
    if (scenario) {
        unsigned long long now = now_us(), oldest = now > 20000000ULL ? now - 20000000ULL : 0;
        unsigned long long from = last > oldest ? last : oldest, k = from * 6 / 1000000ULL;
        unsigned int n = 0, cap = samples == NULL ? 0 : *count;
        for (; sample_ts(k) <= now; k++) {
            unsigned long long ts = sample_ts(k);
            if (ts <= from || k == 0) continue;
            if (samples != NULL && n < cap) {
                samples[n].timeStamp = ts; samples[n].sampleValue.ull = 0; samples[n].sampleValue.ui = util_at(sample_ts(k - 1));
            }
            n++;
        }
        if (n == 0) return NOT_FOUND;
        *vtype = 1;
        *count = samples == NULL ? n : (n < cap ? n : cap);
        return OK;
    }
    unsigned long long t = now_us();
    unsigned long long ts[2] = {t - 500000ULL, t - 200000ULL};
    unsigned int vals[2] = {60, 80}, n = 0;
    for (int i = 0; i < 2; i++) if (ts[i] > last) n++;
    if (n == 0) return NOT_FOUND;
    *vtype = 1;  /* NVML_VALUE_TYPE_UNSIGNED_INT */
    if (samples == NULL) { *count = n; return OK; }
    unsigned int k = 0;
    for (int i = 0; i < 2 && k < *count; i++) if (ts[i] > last) {
        samples[k].timeStamp = ts[i]; samples[k].sampleValue.ull = 0; samples[k].sampleValue.ui = vals[i]; k++;
    }
    *count = k; return OK;
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *p) {
    CHECK_INIT; CHECK_DEV(d);
    if (d->index == 1) return LOST;
    if (scenario) {
        if (gpu0_lost) return LOST;
        unsigned int n = 0, t = 0;
        for (int i = 0; i < njobs; i++) n += running(&jobs[i], now_us());
        if (n > 0 && (p == NULL || *count < n)) { *count = n; return INSUFFICIENT; }
        for (int i = 0; i < njobs; i++) if (running(&jobs[i], now_us())) {
            p[t].pid = jobs[i].pid; p[t].usedGpuMemory = jobs[i].memory;
            p[t].gpuInstanceId = 0xFFFFFFFFu; p[t].computeInstanceId = 0xFFFFFFFFu; t++;
        }
        *count = n; return OK;
    }
    if (p == NULL || *count < 1) { *count = 1; return INSUFFICIENT; }
    const char *pid = getenv("FAKE_NVML_PID");
    p[0].pid = pid ? (unsigned int)atoi(pid) : (unsigned int)getpid();
    p[0].usedGpuMemory = 3ULL << 30; p[0].gpuInstanceId = 0xFFFFFFFFu; p[0].computeInstanceId = 0xFFFFFFFFu;
    *count = 1; return OK;
}
nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t d, nvmlProcessUtilizationSample_t *out, unsigned int *count,
                                             unsigned long long last) {
    CHECK_INIT; CHECK_DEV(d);
    if (!scenario || d->index == 1) return NOT_SUPPORTED;
    unsigned long long now = now_us(), oldest = now > 20000000ULL ? now - 20000000ULL : 0;
    unsigned long long from = last > oldest ? last : oldest, first = from * 6 / 1000000ULL + 1, latest = 0;
    unsigned int nsamples = 0, n = 0, cap = out == NULL ? 0 : *count;
    unsigned int pids[64], sums[64];
    for (unsigned long long k = first; sample_ts(k) <= now; k++) {
        if (sample_ts(k) <= from) continue;
        nsamples++; latest = sample_ts(k);
        for (int i = 0; i < njobs; i++) {
            if (!running(&jobs[i], sample_ts(k - 1)) || jobs[i].util == 0) continue;
            unsigned int at = 0;
            while (at < n && pids[at] != jobs[i].pid) at++;
            if (at == n) { pids[n] = jobs[i].pid; sums[n] = 0; n++; }
            sums[at] += jobs[i].util;
        }
    }
    if (n == 0) return NOT_FOUND;
    if (out == NULL || cap < n) { *count = n; return INSUFFICIENT; }
    for (unsigned int i = 0; i < n; i++) {
        out[i].pid = pids[i]; out[i].timeStamp = latest; out[i].smUtil = sums[i] / nsamples;
        out[i].memUtil = out[i].encUtil = out[i].decUtil = 0;
    }
    *count = n; return OK;
}
