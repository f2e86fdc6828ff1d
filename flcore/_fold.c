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

FLCORE_CLONES static void
scale_loop(double *restrict sum, const float *restrict x, Py_ssize_t n, double w)
{
    for (Py_ssize_t i = 0; i < n; i++)
        sum[i] = w * (double)x[i];
}

FLCORE_CLONES static void
fold_loop(double *restrict sum, const float *restrict x, Py_ssize_t n, double w)
{
    for (Py_ssize_t i = 0; i < n; i++)
        sum[i] = sum[i] + w * (double)x[i]; /* contracted to one FMA where there is one */
}

static void
mean_loop(float *restrict out, const double *restrict sum, Py_ssize_t n, double total)
{
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = (float)(sum[i] / total);
}

/* Both buffers, checked: ``a`` of format ``fa`` (writable), ``b`` of format ``fb``, with
 * the same number of items. On failure both are released and an exception is set. */
static int
get_pair(PyObject *args, Py_buffer *a, const char *fa, Py_buffer *b, const char *fb, double *w)
{
    PyObject *oa, *ob;
    if (!PyArg_ParseTuple(args, "OOd", &oa, &ob, w))
        return -1;
    if (PyObject_GetBuffer(oa, a, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0)
        return -1;
    if (PyObject_GetBuffer(ob, b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(a);
        return -1;
    }
    const char *why = NULL;
    if (strcmp(a->format, fa) != 0 || strcmp(b->format, fb) != 0)
        why = "wrong item formats";
    else if (a->len / a->itemsize != b->len / b->itemsize)
        why = "lengths differ";
    if (why != NULL) {
        PyErr_Format(PyExc_ValueError, "expected buffers of formats '%s' and '%s' of one length: "
                     "%s (got '%s' x %zd and '%s' x %zd)", fa, fb, why, a->format,
                     a->len / a->itemsize, b->format, b->len / b->itemsize);
        PyBuffer_Release(a);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static PyObject *
fold_scale(PyObject *self, PyObject *args)
{
    Py_buffer sum, x;
    double w;
    if (get_pair(args, &sum, "d", &x, "f", &w) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    scale_loop(sum.buf, x.buf, x.len / x.itemsize, w);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&sum);
    PyBuffer_Release(&x);
    Py_RETURN_NONE;
}

static PyObject *
fold_add(PyObject *self, PyObject *args)
{
    Py_buffer sum, x;
    double w;
    if (get_pair(args, &sum, "d", &x, "f", &w) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    fold_loop(sum.buf, x.buf, x.len / x.itemsize, w);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&sum);
    PyBuffer_Release(&x);
    Py_RETURN_NONE;
}

static PyObject *
fold_mean(PyObject *self, PyObject *args)
{
    Py_buffer out, sum;
    double total;
    if (get_pair(args, &out, "f", &sum, "d", &total) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    mean_loop(out.buf, sum.buf, sum.len / sum.itemsize, total);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    PyBuffer_Release(&sum);
    Py_RETURN_NONE;
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
