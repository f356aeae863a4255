/* sharedpool._speedups: the lease table's hot moves in C.
 *
 * The twin of sharedpool/table/core.py's PyTableCore, move for move: the
 * same arguments, the same results, the same bytes written (the
 * equivalence test in tests/test_speedups.py holds the two together). A
 * process on this module and one on the pure-Python path share one table,
 * so the offsets below are layout.py's and locks.py's; core.py compares
 * LAYOUT with them before using this module.
 *
 * Everything runs with the GIL held: a lock is a non-blocking fcntl of
 * well under a microsecond, less than releasing and taking back the GIL,
 * and no other thread of this process can then unmap the table (Table.close)
 * or run a signal handler between our lock and our row write.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* Older C libraries (manylinux2014's glibc 2.17) lack the names, not the
 * kernel's support: locks.py falls back to the same numbers. */
#ifndef F_OFD_SETLK
#define F_OFD_SETLK 37
#endif

/* table/layout.py */
#define ROWS_AT 256
#define ROW_SIZE 512
#define FLAGS_AT 6
#define SLOTS_IN_USE_AT 12
#define WAITERS_AT 28
#define DB_AT 1
#define ROW_FLAGS_AT 3
#define GENERATION_AT 4
#define PID_AT 8
#define SITE_AT 12
#define SEQ_AT 16
#define START_AT 24
#define ACQUIRED_AT 32
#define REVOKED_GENERATION_AT 40
#define REVOKED_SEQ_AT 48
#define EXPIRES_AT 56
#define WAIT_HIST_AT 64
#define HOLD_HIST_AT (WAIT_HIST_AT + 8 * HISTOGRAM_BUCKETS)
#define HISTOGRAM_BUCKETS 24
#define READY 1
#define HELD 2
#define RESET 3
#define BROKEN 4
#define CLEAN 0
#define NEEDS_RESET 1
/* table/locks.py */
#define LOCK_BASE (INT64_C(1) << 40)
#define SLOT_LOCKS_AT (LOCK_BASE + (INT64_C(1) << 32))
#define GENERATIONS_PER_SLOT (INT64_C(1) << 24)

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* the mmap's: while we hold it, mmap.close() refuses (BufferError) */
    unsigned char *base; /* NULL once closed */
    Py_ssize_t capacity;
} Core;

/* Every field store is one store of its width: a reader without the lock
 * sees the old value or the new one, never a byte pattern nobody wrote.
 * Relaxed atomics say so to the compiler (no tearing, no merging). */
#define STORE(type, at, value) __atomic_store_n((type *)(at), (type)(value), __ATOMIC_RELAXED)
#define LOAD(type, at) __atomic_load_n((type *)(at), __ATOMIC_RELAXED)

static double
store_f64_bits(unsigned char *at, double value)
{
    uint64_t bits;
    memcpy(&bits, &value, 8);
    STORE(uint64_t, at, bits);
    return value;
}

static double
load_f64(const unsigned char *at)
{
    uint64_t bits = LOAD(uint64_t, at);
    double value;
    memcpy(&value, &bits, 8);
    return value;
}

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic()'s clock: shared by every process of the host */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int64_t
slot_lock(Py_ssize_t slot, uint32_t generation)
{
    return SLOT_LOCKS_AT + (int64_t)slot * GENERATIONS_PER_SLOT + (int64_t)(generation % GENERATIONS_PER_SLOT);
}

/* 1: locked; 0: another description holds it; -1: an error (set). */
static int
try_lock(int fd, int64_t offset)
{
    struct flock lock = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = offset, .l_len = 1, .l_pid = 0};
    if (fcntl(fd, F_OFD_SETLK, &lock) == 0)
        return 1;
    if (errno == EAGAIN || errno == EACCES)
        return 0;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

static void
unlock(int fd, int64_t offset)
{
    struct flock lock = {.l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = offset, .l_len = 1, .l_pid = 0};
    /* EBADF: the taker's description is gone (its thread ended), and so is the lock. */
    (void)fcntl(fd, F_OFD_SETLK, &lock);
}

/* Table.count: bucket i holds durations below 10 us * 2**i, the last one the rest. */
static void
count(unsigned char *row, int histogram_at, double seconds)
{
    int index = 0;
    if (seconds >= 10e-6) {
        double scaled = seconds * 1e5;
        if (scaled >= 8388608.0) { /* 2**23: bit_length 24 and up, the last bucket */
            index = HISTOGRAM_BUCKETS - 1;
        } else {
            uint64_t whole = (uint64_t)scaled;
            while (whole) {
                index++;
                whole >>= 1;
            }
        }
    }
    unsigned char *at = row + histogram_at + 8 * index;
    STORE(uint64_t, at, LOAD(uint64_t, at) + 1);
}

static int
as_fd(PyObject *value)
{
    long fd = PyLong_AsLong(value);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%ld is no file descriptor", fd);
        return -1;
    }
    return (int)fd;
}

static unsigned char *
live_base(Core *self)
{
    if (self->base == NULL)
        PyErr_SetString(PyExc_ValueError, "the lease table is closed");
    return self->base;
}

/* The take of one slot: 1 taken (*result set), 0 not this one, -1 error. */
static int
take_slot(Core *self, Py_ssize_t slot, int fd, PyObject *avoid, unsigned db, int32_t pid, double start,
          uint32_t site, double started, double now_given, PyObject **result)
{
    unsigned char *row = self->base + ROWS_AT + slot * ROW_SIZE;
    uint32_t generation = LOAD(uint32_t, row + GENERATION_AT);
    if (avoid != NULL) {
        PyObject *key = Py_BuildValue("(nI)", slot, generation);
        if (key == NULL)
            return -1;
        int skip = PySet_Contains(avoid, key);
        Py_DECREF(key);
        if (skip)
            return skip < 0 ? -1 : 0;
    }
    int64_t offset = slot_lock(slot, generation);
    int locked = try_lock(fd, offset);
    if (locked <= 0)
        return locked;
    /* Under the lock, the row is ours to judge: the manager rebinds a slot
     * to another database, or replaces its connection, only holding it. */
    uint16_t row_db;
    memcpy(&row_db, row + DB_AT, 2);
    uint64_t last_seq = LOAD(uint64_t, row + SEQ_AT);
    if (LOAD(uint8_t, row) != READY || LOAD(uint32_t, row + GENERATION_AT) != generation || row_db != db ||
        /* The row's last lease was asked back: its connection is being shut down. */
        (last_seq != 0 && LOAD(uint64_t, row + REVOKED_SEQ_AT) == last_seq &&
         LOAD(uint32_t, row + REVOKED_GENERATION_AT) == generation)) {
        unlock(fd, offset);
        return 0;
    }
    uint64_t seq = last_seq + 1;
    if (seq == 0)
        seq = 1; /* a scribbled maximum wraps, never to 0 (no lease) */
    double now = now_given >= 0 ? now_given : monotonic();
    STORE(int32_t, row + PID_AT, pid);
    STORE(uint32_t, row + SITE_AT, site);
    STORE(uint64_t, row + SEQ_AT, seq);
    store_f64_bits(row + START_AT, start);
    store_f64_bits(row + ACQUIRED_AT, now);
    STORE(uint8_t, row + ROW_FLAGS_AT, 0);
    /* HELD last, with release order: a reader that sees it sees the holder
     * written (the manager's row_settled asks for both). */
    __atomic_store_n(row, (uint8_t)HELD, __ATOMIC_RELEASE);
    count(row, WAIT_HIST_AT, now - started);
    *result = Py_BuildValue("(nIKd)", slot, generation, (unsigned long long)seq, now);
    return *result == NULL ? -1 : 1;
}

static int
ready_of(Core *self, Py_ssize_t slot, unsigned db, int check_db)
{
    unsigned char *row = self->base + ROWS_AT + slot * ROW_SIZE;
    if (LOAD(uint8_t, row) != READY)
        return 0;
    if (!check_db)
        return 1;
    uint16_t row_db;
    memcpy(&row_db, row + DB_AT, 2);
    return row_db == db;
}

/* A slot number from the caller's cache, or -1 when it is none of ours. */
static Py_ssize_t
slot_number(Core *self, PyObject *key)
{
    if (!PyLong_CheckExact(key))
        return -1;
    Py_ssize_t slot = PyLong_AsSsize_t(key);
    if (slot == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return slot >= 0 && slot < self->capacity ? slot : -1;
}

PyDoc_STRVAR(take_doc,
"take(lock_fd, last, cached, avoid, db, pid, start, site, started, now=-1.0)\n--\n\n"
"Lock and take the first READY row of db: last first, then cached's slots, then the rest.\n"
"(slot, generation, lease seq, acquired at), or None. See core.PyTableCore.take.");

static PyObject *
Core_take(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9 && nargs != 10) {
        PyErr_Format(PyExc_TypeError, "take() takes 9 or 10 arguments (%zd given)", nargs);
        return NULL;
    }
    if (live_base(self) == NULL)
        return NULL;
    int fd = as_fd(args[0]);
    Py_ssize_t last = PyLong_AsSsize_t(args[1]);
    PyObject *cached = args[2];
    PyObject *avoid = args[3];
    unsigned long db = PyLong_AsUnsignedLong(args[4]);
    long pid = PyLong_AsLong(args[5]);
    double start = PyFloat_AsDouble(args[6]);
    unsigned long site = PyLong_AsUnsignedLong(args[7]);
    double started = PyFloat_AsDouble(args[8]);
    double now = nargs == 10 ? PyFloat_AsDouble(args[9]) : -1.0;
    if (PyErr_Occurred())
        return NULL;
    if (!PyDict_Check(cached)) {
        PyErr_SetString(PyExc_TypeError, "take(): cached must be a dict keyed by slot");
        return NULL;
    }
    if (!PyAnySet_Check(avoid)) {
        PyErr_SetString(PyExc_TypeError, "take(): avoid must be a set of (slot, generation)");
        return NULL;
    }
    if (db > 0xFFFF || site > 0xFFFFFFFFUL || pid < INT32_MIN || pid > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "take(): db, pid or site out of the row's range");
        return NULL;
    }
    PyObject *avoiding = PySet_GET_SIZE(avoid) ? avoid : NULL;
    PyObject *result = NULL;
    int got;
    int tried_last = 0;
    if (last >= 0 && last < self->capacity) {
        PyObject *key = PyLong_FromSsize_t(last);
        if (key == NULL)
            return NULL;
        int known = PyDict_Contains(cached, key);
        Py_DECREF(key);
        if (known < 0)
            return NULL;
        /* Its database is checked under the lock: no extra read. */
        if (known && ready_of(self, last, 0, 0)) {
            tried_last = 1;
            got = take_slot(self, last, fd, avoiding, (unsigned)db, (int32_t)pid, start, (uint32_t)site, started, now, &result);
            if (got)
                return got < 0 ? NULL : result;
        }
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(cached, &pos, &key, &value)) {
        Py_ssize_t slot = slot_number(self, key);
        if (slot < 0 || (tried_last && slot == last) || !ready_of(self, slot, (unsigned)db, 1))
            continue;
        got = take_slot(self, slot, fd, avoiding, (unsigned)db, (int32_t)pid, start, (uint32_t)site, started, now, &result);
        if (got)
            return got < 0 ? NULL : result;
    }
    uint32_t in_use = LOAD(uint32_t, self->base + SLOTS_IN_USE_AT);
    Py_ssize_t slots = (Py_ssize_t)in_use < self->capacity ? (Py_ssize_t)in_use : self->capacity;
    for (Py_ssize_t slot = 0; slot < slots; slot++) {
        if (!ready_of(self, slot, (unsigned)db, 1))
            continue;
        PyObject *number = PyLong_FromSsize_t(slot);
        if (number == NULL)
            return NULL;
        int known = PyDict_Contains(cached, number);
        Py_DECREF(number);
        if (known < 0)
            return NULL;
        if (known)
            continue;
        got = take_slot(self, slot, fd, avoiding, (unsigned)db, (int32_t)pid, start, (uint32_t)site, started, now, &result);
        if (got)
            return got < 0 ? NULL : result;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(give_back_doc,
"give_back(lock_fd, slot, generation, seq, outcome, taken_at, used, now=-1.0)\n--\n\n"
"Count the hold, write the outcome if the row is still this lease, unlock.\n"
"(outcome written or -1, anyone waiting). See core.PyTableCore.give_back.");

static PyObject *
Core_give_back(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 && nargs != 8) {
        PyErr_Format(PyExc_TypeError, "give_back() takes 7 or 8 arguments (%zd given)", nargs);
        return NULL;
    }
    if (live_base(self) == NULL)
        return NULL;
    int fd = as_fd(args[0]);
    Py_ssize_t slot = PyLong_AsSsize_t(args[1]);
    unsigned long generation = PyLong_AsUnsignedLong(args[2]);
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[3]);
    long outcome = PyLong_AsLong(args[4]);
    double taken_at = PyFloat_AsDouble(args[5]);
    int used = PyObject_IsTrue(args[6]);
    double now = nargs == 8 ? PyFloat_AsDouble(args[7]) : -1.0;
    if (PyErr_Occurred())
        return NULL;
    if (slot < 0 || slot >= self->capacity) {
        PyErr_Format(PyExc_ValueError, "slot %zd outside the table's %zd rows", slot, self->capacity);
        return NULL;
    }
    if (outcome < CLEAN || outcome > 2 || generation > 0xFFFFFFFFUL) {
        PyErr_Format(PyExc_ValueError, "give_back(): outcome %ld or generation %lu is none", outcome, generation);
        return NULL;
    }
    if (now < 0)
        now = monotonic();
    unsigned char *row = self->base + ROWS_AT + slot * ROW_SIZE;
    if (used)
        count(row, HOLD_HIST_AT, now - taken_at);
    long written = -1;
    /* The one compare before the give-back's write: a row no longer this
     * lease (revoked, repaired, a newer generation) is not ours to write. */
    if (LOAD(uint8_t, row) == HELD && LOAD(uint32_t, row + GENERATION_AT) == generation &&
        LOAD(uint64_t, row + SEQ_AT) == seq) {
        double expires_at = load_f64(row + EXPIRES_AT);
        written = outcome;
        if (LOAD(uint64_t, row + REVOKED_SEQ_AT) == seq && LOAD(uint32_t, row + REVOKED_GENERATION_AT) == generation)
            written = 3; /* Outcome.REVOKED: the manager asked for it back; the row says BROKEN */
        else if (outcome == CLEAN && expires_at != 0.0 && now >= expires_at)
            written = 2; /* Outcome.BROKEN: an expired connection goes back to be replaced */
        STORE(uint32_t, row + PID_AT, 0);
        STORE(uint32_t, row + SITE_AT, 0);
        store_f64_bits(row + START_AT, 0.0);
        store_f64_bits(row + ACQUIRED_AT, 0.0);
        STORE(uint8_t, row + ROW_FLAGS_AT, 0);
        __atomic_store_n(row, (uint8_t)(written == CLEAN ? READY : written == NEEDS_RESET ? RESET : BROKEN), __ATOMIC_RELEASE);
    }
    unlock(fd, slot_lock(slot, (uint32_t)generation));
    int waiting = LOAD(int32_t, self->base + WAITERS_AT) > 0;
    return Py_BuildValue("(lO)", written, waiting ? Py_True : Py_False);
}

static int
table_idle(const unsigned char *base)
{
    return LOAD(uint16_t, base + FLAGS_AT) == 0 && LOAD(int32_t, base + WAITERS_AT) == 0;
}

static int
asked_back(const unsigned char *row, uint32_t generation, uint64_t seq)
{
    return LOAD(uint64_t, row + REVOKED_SEQ_AT) == seq && LOAD(uint32_t, row + REVOKED_GENERATION_AT) == generation;
}

/* The arguments renew() and quiet() open with: a lease (slot, generation, seq) of a row
 * inside the table. 0, or -1 with the error set. */
static int
lease_args(Core *self, const char *name, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected,
           Py_ssize_t *slot, unsigned long *generation, unsigned long long *seq)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, expected, nargs);
        return -1;
    }
    if (live_base(self) == NULL)
        return -1;
    *slot = PyLong_AsSsize_t(args[0]);
    *generation = PyLong_AsUnsignedLong(args[1]);
    *seq = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return -1;
    if (*slot < 0 || *slot >= self->capacity) {
        PyErr_Format(PyExc_ValueError, "slot %zd outside the table's %zd rows", *slot, self->capacity);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(renew_doc,
"renew(slot, generation, seq, pid, start, site, taken_at, started, now, idle_only)\n--\n\n"
"Give lease seq back clean and take the row for pid, its lock kept: the new lease number, or 0.\n"
"See core.PyTableCore.renew.");

static PyObject *
Core_renew(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t slot;
    unsigned long generation;
    unsigned long long seq;
    if (lease_args(self, "renew", args, nargs, 10, &slot, &generation, &seq) < 0)
        return NULL;
    long pid = PyLong_AsLong(args[3]);
    double start = PyFloat_AsDouble(args[4]);
    unsigned long site = PyLong_AsUnsignedLong(args[5]);
    double taken_at = PyFloat_AsDouble(args[6]);
    double started = PyFloat_AsDouble(args[7]);
    double now = PyFloat_AsDouble(args[8]);
    int idle_only = PyObject_IsTrue(args[9]);
    if (PyErr_Occurred())
        return NULL;
    if (generation > 0xFFFFFFFFUL || site > 0xFFFFFFFFUL || pid < INT32_MIN || pid > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "renew(): generation, pid or site out of the row's range");
        return NULL;
    }
    if (idle_only && !table_idle(self->base))
        return PyLong_FromLong(0);
    unsigned char *row = self->base + ROWS_AT + slot * ROW_SIZE;
    if (LOAD(uint8_t, row) != HELD || LOAD(uint32_t, row + GENERATION_AT) != generation ||
        LOAD(uint64_t, row + SEQ_AT) != seq)
        return PyLong_FromLong(0); /* repaired or replaced under us: the ordinary give-back says so */
    double expires_at = load_f64(row + EXPIRES_AT);
    if (asked_back(row, (uint32_t)generation, seq) || (expires_at != 0.0 && now >= expires_at))
        return PyLong_FromLong(0);
    uint64_t next = (uint64_t)seq + 1;
    if (next == 0)
        next = 1;
    /* The row stays HELD throughout: only the holder's fields change. */
    STORE(int32_t, row + PID_AT, pid);
    STORE(uint32_t, row + SITE_AT, site);
    STORE(uint64_t, row + SEQ_AT, next);
    store_f64_bits(row + START_AT, start);
    store_f64_bits(row + ACQUIRED_AT, now);
    STORE(uint8_t, row + ROW_FLAGS_AT, 0);
    if (taken_at >= 0)
        count(row, HOLD_HIST_AT, now - taken_at);
    if (started >= 0)
        count(row, WAIT_HIST_AT, now - started);
    return PyLong_FromUnsignedLongLong(next);
}

PyDoc_STRVAR(quiet_doc,
"quiet(slot, generation, seq)\n--\n\n"
"Neither paused nor waited on, and lease seq not asked back. See core.PyTableCore.quiet.");

static PyObject *
Core_quiet(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t slot;
    unsigned long generation;
    unsigned long long seq;
    if (lease_args(self, "quiet", args, nargs, 3, &slot, &generation, &seq) < 0)
        return NULL;
    if (!table_idle(self->base))
        Py_RETURN_FALSE;
    const unsigned char *row = self->base + ROWS_AT + slot * ROW_SIZE;
    if (seq != 0 && generation <= 0xFFFFFFFFUL && asked_back(row, (uint32_t)generation, seq))
        Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

static PyObject *
Core_close(Core *self, PyObject *Py_UNUSED(ignored))
{
    if (self->base != NULL) {
        self->base = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static int
Core_init(Core *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"map", "capacity", NULL};
    PyObject *map;
    Py_ssize_t capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On", keywords, &map, &capacity))
        return -1;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_TypeError, "Core() is initialised once");
        return -1;
    }
    if (capacity < 0 || capacity > (PY_SSIZE_T_MAX - ROWS_AT) / ROW_SIZE) {
        PyErr_Format(PyExc_ValueError, "capacity %zd is no table's", capacity);
        return -1;
    }
    if (PyObject_GetBuffer(map, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return -1;
    if (self->view.len < ROWS_AT + capacity * ROW_SIZE) {
        PyErr_Format(PyExc_ValueError, "a mapping of %zd bytes holds no table of %zd rows", self->view.len, capacity);
        PyBuffer_Release(&self->view);
        return -1;
    }
    /* Aligned 8-byte fields as single stores need an aligned row. */
    if ((uintptr_t)self->view.buf % 8) {
        PyErr_SetString(PyExc_ValueError, "the lease table's mapping is not 8-byte aligned");
        PyBuffer_Release(&self->view);
        return -1;
    }
    self->base = self->view.buf;
    self->capacity = capacity;
    return 0;
}

static void
Core_dealloc(Core *self)
{
    Core_close(self, NULL);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Core_methods[] = {
    {"take", (PyCFunction)(void (*)(void))Core_take, METH_FASTCALL, take_doc},
    {"give_back", (PyCFunction)(void (*)(void))Core_give_back, METH_FASTCALL, give_back_doc},
    {"renew", (PyCFunction)(void (*)(void))Core_renew, METH_FASTCALL, renew_doc},
    {"quiet", (PyCFunction)(void (*)(void))Core_quiet, METH_FASTCALL, quiet_doc},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "Let go of the mapping: every later move raises ValueError."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sharedpool._speedups.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The lease table's hot moves over one mapping (C twin of core.PyTableCore).",
    .tp_methods = Core_methods,
    .tp_init = (initproc)Core_init,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Core_dealloc,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sharedpool._speedups",
    .m_doc = "The lease table's hot path in C (see sharedpool.table.core).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* What core.py compares with layout.py and locks.py before trusting us. */
    static const struct {
        const char *name;
        long long value;
    } constants[] = {
        {"ROWS_AT", ROWS_AT}, {"ROW_SIZE", ROW_SIZE}, {"FLAGS_AT", FLAGS_AT}, {"SLOTS_IN_USE_AT", SLOTS_IN_USE_AT},
        {"WAITERS_AT", WAITERS_AT}, {"DB_AT", DB_AT}, {"FLAGS_OF_ROW_AT", ROW_FLAGS_AT}, {"EXPIRES_AT", EXPIRES_AT},
        {"REVOKE_AT", REVOKED_GENERATION_AT},
        {"WAIT_HIST_AT", WAIT_HIST_AT}, {"HOLD_HIST_AT", HOLD_HIST_AT}, {"HISTOGRAM_BUCKETS", HISTOGRAM_BUCKETS},
        {"LAYOUT_VERSION", 2}, {"SLOT_LOCK_0_0", SLOT_LOCKS_AT}, {"SLOT_LOCK_1_0", SLOT_LOCKS_AT + GENERATIONS_PER_SLOT},
    };
    PyObject *layout = PyDict_New();
    for (size_t i = 0; layout != NULL && i < sizeof constants / sizeof constants[0]; i++) {
        PyObject *value = PyLong_FromLongLong(constants[i].value);
        if (value == NULL || PyDict_SetItemString(layout, constants[i].name, value) < 0)
            Py_CLEAR(layout);
        Py_XDECREF(value);
    }
    Py_INCREF(&CoreType);
    if (layout == NULL || PyModule_AddObject(m, "LAYOUT", layout) < 0 ||
        PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
