/*
 * Fault injection under fsync(2) and fdatasync(2), for tests: loaded into keymeter (or a
 * test binary) with LD_PRELOAD, it makes the syncs of chosen files block or fail, so a
 * test can tell "answered after fsync" from "answered from the page cache".
 *
 * KEYMETER_FSYNC_FAULT_DIR     control directory (required; without it nothing changes)
 * KEYMETER_FSYNC_FAULT_PREFIX  only files whose path starts with this are affected
 *
 * <dir>/mode holds one word, read at every call:
 *   pass (or no file)  the real call
 *   fail               fails with EIO, syncing nothing
 *   hold               blocks until the mode changes, then acts on the new mode
 * Every affected call appends lines to <dir>/calls (one write each, O_APPEND):
 *   "hold <call> <path>" when it starts to block, and "<call> <path> ok|failed" when done.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum mode { PASS, FAIL, HOLD };

static enum mode read_mode(const char *dir) {
    char path[PATH_MAX];
    char word[16] = {0};
    snprintf(path, sizeof path, "%s/mode", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return PASS;
    }
    ssize_t n = read(fd, word, sizeof word - 1);
    close(fd);
    if (n > 0 && strncmp(word, "fail", 4) == 0) {
        return FAIL;
    }
    if (n > 0 && strncmp(word, "hold", 4) == 0) {
        return HOLD;
    }
    return PASS;
}

static void log_line(const char *dir, const char *line) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/calls", dir);
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        ssize_t ignored = write(fd, line, strlen(line));
        (void)ignored;
        close(fd);
    }
}

/* -1 with errno = EIO when the call is to fail, 1 when it is to run, 0 when not ours. */
static int intercept(const char *call, int fd, char *target, size_t target_len) {
    const char *dir = getenv("KEYMETER_FSYNC_FAULT_DIR");
    const char *prefix = getenv("KEYMETER_FSYNC_FAULT_PREFIX");
    if (dir == NULL) {
        return 0;
    }
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, target_len - 1);
    if (n < 0) {
        return 0;
    }
    target[n] = '\0';
    if (prefix != NULL && strncmp(target, prefix, strlen(prefix)) != 0) {
        return 0;
    }
    enum mode mode = read_mode(dir);
    if (mode == HOLD) {
        char line[PATH_MAX + 64];
        snprintf(line, sizeof line, "hold %s %s\n", call, target);
        log_line(dir, line);
        struct timespec tick = {0, 1000000};
        while ((mode = read_mode(dir)) == HOLD) {
            nanosleep(&tick, NULL);
        }
    }
    return mode == FAIL ? -1 : 1;
}

static int faulty(const char *call, int fd, int (*real)(int)) {
    char target[PATH_MAX];
    int verdict = intercept(call, fd, target, sizeof target);
    if (verdict == 0) {
        return real(fd);
    }
    int rc = -1;
    int err = EIO;
    if (verdict > 0) {
        rc = real(fd);
        err = errno;
    }
    char line[PATH_MAX + 64];
    snprintf(line, sizeof line, "%s %s %s\n", call, target, rc == 0 ? "ok" : "failed");
    log_line(getenv("KEYMETER_FSYNC_FAULT_DIR"), line);
    errno = err;
    return rc;
}

int fsync(int fd) {
    static int (*real)(int);
    if (real == NULL) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    }
    return faulty("fsync", fd, real);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (real == NULL) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    }
    return faulty("fdatasync", fd, real);
}
