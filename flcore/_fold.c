/* The exact FedAvg fold of float32 weights into a float64 sum, in one pass.
 *
 * torch has no kernel that reads a float32 tensor, widens it to float64, multiplies it by
 * a weight and adds it to a float64 tensor: it takes two passes (a conversion, then the
 * add), and a single core then averages at about half the speed of a plain copy. These
 * loops do it in one pass, with the same arithmetic: each element's product is added with
 * one rounding where the CPU has FMA (as torch's vectorised add does there) and with two
 * where it has not (as torch does there), so the sums have the same bits as torch's. Where
 * the module was not built (no C compiler), flcore.aggregation folds with torch instead.
 *
 * Every function takes contiguous buffers (numpy arrays): the sum ("d", writable) and the
 * weights ("f"), of the same length, and releases the GIL while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one copy of the loop for CPUs with FMA, one for the rest, picked once at load time */
#define FLCORE_CLONES __attribute__((target_clones("fma", "default")))
#else
#define FLCORE_CLONES
#endif

/* Each loop: out (n items, written), in (n items, read), a number. */
typedef void (*loop_fn)(void *out, const void *in, Py_ssize_t n, double w);

FLCORE_CLONES static void
scale_loop(void *out, const void *in, Py_ssize_t n, double w)
{
    double *restrict sum = out;
    const float *restrict x = in;
    for (Py_ssize_t i = 0; i < n; i++)
        sum[i] = w * (double)x[i];
}

FLCORE_CLONES static void
fold_loop(void *out, const void *in, Py_ssize_t n, double w)
{
    double *restrict sum = out;
    const float *restrict x = in;
    for (Py_ssize_t i = 0; i < n; i++)
        sum[i] = sum[i] + w * (double)x[i]; /* contracted to one FMA where there is one */
}

static void
mean_loop(void *out, const void *in, Py_ssize_t n, double total)
{
    float *restrict mean = out;
    const double *restrict sum = in;
    for (Py_ssize_t i = 0; i < n; i++)
        mean[i] = (float)(sum[i] / total);
}

/* Parse ``(out, in, number)``, check that ``out`` is a writable contiguous buffer of format
 * ``fout`` and ``in`` a contiguous buffer of format ``fin`` with as many items, and run
 * ``loop`` over them without the GIL. */
static PyObject *
apply(PyObject *args, const char *fout, const char *fin, loop_fn loop)
{
    PyObject *oa, *ob;
    Py_buffer a, b;
    double w;
    if (!PyArg_ParseTuple(args, "OOd", &oa, &ob, &w))
        return NULL;
    if (PyObject_GetBuffer(oa, &a, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(ob, &b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&a);
        return NULL;
    }
    const char *why = NULL;
    Py_ssize_t na = a.len / a.itemsize, nb = b.len / b.itemsize;
    if (strcmp(a.format, fout) != 0 || strcmp(b.format, fin) != 0)
        why = "wrong item formats";
    else if (na != nb)
        why = "lengths differ";
    if (why != NULL) {
        PyErr_Format(PyExc_ValueError, "expected buffers of formats '%s' and '%s' of one length: "
                     "%s (got '%s' x %zd and '%s' x %zd)", fout, fin, why, a.format, na,
                     b.format, nb);
    } else {
        Py_BEGIN_ALLOW_THREADS
        loop(a.buf, b.buf, na, w);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    if (why != NULL)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
fold_scale(PyObject *self, PyObject *args)
{
    return apply(args, "d", "f", scale_loop);
}

static PyObject *
fold_add(PyObject *self, PyObject *args)
{
    return apply(args, "d", "f", fold_loop);
}

static PyObject *
fold_mean(PyObject *self, PyObject *args)
{
    return apply(args, "f", "d", mean_loop);
}

static PyMethodDef methods[] = {
    {"scale", fold_scale, METH_VARARGS,
     "scale(sum, x, w): sum = w * x (sum float64, x float32)."},
    {"add", fold_add, METH_VARARGS,
     "add(sum, x, w): sum += w * x (sum float64, x float32)."},
    {"mean", fold_mean, METH_VARARGS,
     "mean(out, sum, total): out = float32(sum / total)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "flcore._fold",
    "One-pass float32-into-float64 folds for flcore.aggregation.", -1, methods,
};

PyMODINIT_FUNC
PyInit__fold(void)
{
    return PyModule_Create(&module);
}
