// The [yolo] losses' truth part on the device (engine/backends/operations.py:
// apply_truth_events_; the plan's layout in engine/backends/yolo_truths.py). One thread per
// touched cell applies that cell's events one after the other, as the numpy code's rounds do
// (engine/backends/yolo_truths.py: PjreddieTruthDeltas, AlexeyabTruthDeltas), then
// averages_yolo_deltas; events on different cells never interact. The
// cell's delta row is kept in float (as the host code's gathered rows), the arithmetic in double
// where the numpy code computes in float64, in float where it computes in float32.
#include <cfloat>

#include "storage.cuh"

#define MSE 0
#define IOU 1
#define GIOU 2
#define DIOU 3
#define CIOU 4
#define PI 3.141592653589793
#define CIOU_EPSILON (1.0 / 1000000)  // box.c's 0.000001 in dx_box_iou's CIoU term

// numpy's minimum and maximum: a NaN operand gives NaN
__device__ double np_min(double a, double b) { return (a != a || b != b) ? a + b : fmin(a, b); }
__device__ double np_max(double a, double b) { return (a != a || b != b) ? a + b : fmax(a, b); }

// engine.boxes.iou_or_zero: 0 where the intersection or the union is 0
__device__ double iou_or_zero(double ax, double ay, double aw, double ah, double bx, double by,
                              double bw, double bh)
{
    double ow = np_min(ax + aw / 2, bx + bw / 2) - np_max(ax - aw / 2, bx - bw / 2);
    double oh = np_min(ay + ah / 2, by + bh / 2) - np_max(ay - ah / 2, by - bh / 2);
    double inter = (ow < 0 || oh < 0) ? 0.0 : ow * oh;
    double uni = aw * ah + bw * bh - inter;
    return (inter == 0 || uni == 0) ? 0.0 : inter / uni;
}

// engine.boxes.box_iou_kind(a, b, "giou")
__device__ double giou_of(double ax, double ay, double aw, double ah, double bx, double by,
                          double bw, double bh)
{
    double iou = iou_or_zero(ax, ay, aw, ah, bx, by, bw, bh);
    double cw = np_max(ax + aw / 2, bx + bw / 2) - np_min(ax - aw / 2, bx - bw / 2);
    double ch = np_max(ay + ah / 2, by + bh / 2) - np_min(ay - ah / 2, by - bh / 2);
    double c = cw * ch;
    double w = np_min(ax + aw / 2, bx + bw / 2) - np_max(ax - aw / 2, bx - bw / 2);
    double h = np_min(ay + ah / 2, by + bh / 2) - np_max(ay - ah / 2, by - bh / 2);
    double inter = (w < 0 || h < 0) ? 0.0 : w * h;
    double inter_union = aw * ah + bw * bh - inter;
    return c == 0 ? iou : iou - (c - inter_union) / c;
}

// engine.boxes.dx_box_iou (AlexeyAB's box.c): d = (dx, dy, dw, dh) for iou_loss `kind`
__device__ void dx_box_iou(double px, double py, double pw, double ph, double tx, double ty,
                           double tw, double th, int kind, double *d)
{
    double pt = np_min(py - ph / 2, py + ph / 2), pb = np_max(py - ph / 2, py + ph / 2);
    double pl = np_min(px - pw / 2, px + pw / 2), pr = np_max(px - pw / 2, px + pw / 2);
    double tt = ty - th / 2, tb = ty + th / 2, tl = tx - tw / 2, tr = tx + tw / 2;
    double X = (pb - pt) * (pr - pl);
    double Xhat = (tb - tt) * (tr - tl);
    double Ih = np_min(pb, tb) - np_max(pt, tt);
    double Iw = np_min(pr, tr) - np_max(pl, tl);
    double I = Iw * Ih;  // not clamped at 0, as in the C
    double U = X + Xhat - I;
    double S = (px - tx) * (px - tx) + (py - ty) * (py - ty);
    double gCw = np_max(pr, tr) - np_min(pl, tl);
    double gCh = np_max(pb, tb) - np_min(pt, tt);
    double gC = gCw * gCh;
    // sides in the order t, b, l, r
    double dX[4] = {-(pr - pl), pr - pl, -(pb - pt), pb - pt};
    double dI[4] = {pt > tt ? -Iw : 0.0, pb < tb ? Iw : 0.0, pl > tl ? -Ih : 0.0,
                    pr < tr ? Ih : 0.0};
    double dC[4] = {pt < tt ? -gCw : 0.0, pb > tb ? gCw : 0.0, pl < tl ? -gCh : 0.0,
                    pr > tr ? gCh : 0.0};
    double p[4];
    bool apart = Iw <= 0 || Ih <= 0;
    for (int k = 0; k < 4; ++k) {
        double dU = dX[k] - dI[k];
        p[k] = U > 0 ? ((U * dI[k]) - (I * dU)) / (U * U) : 0.0;
        if (kind == GIOU) {
            double g = gC != 0 ? ((gC * dU) - (U * dC[k])) / (gC * gC) : nan("");
            p[k] = apart ? g : (gC > 0 ? p[k] + g : p[k]);
        }
    }
    d[0] = p[2] + p[3];
    d[1] = p[0] + p[1];
    d[2] = p[3] - p[2];
    d[3] = p[1] - p[0];
    if (kind != DIOU && kind != CIOU) return;
    double Cw = np_max(px + pw / 2, tx + tw / 2) - np_min(px - pw / 2, tx - tw / 2);
    double Ch = np_max(py + ph / 2, ty + th / 2) - np_min(py - ph / 2, ty - th / 2);
    double C = Cw * Cw + Ch * Ch;
    double dCw_dx = (pr > tr ? 1.0 : 0.0) - (pl < tl ? 1.0 : 0.0);
    double dCw_dw = (pr > tr ? 0.5 : 0.0) - (pl < tl ? -0.5 : 0.0);
    double dCh_dy = (pb > tb ? 1.0 : 0.0) - (pt < tt ? 1.0 : 0.0);
    double dCh_dh = (pb > tb ? 0.5 : 0.0) - (pt < tt ? -0.5 : 0.0);
    double alpha_dw = 0.0, alpha_dh = 0.0;
    if (kind == CIOU) {
        double atan_diff = atan(tw / th) - atan(pw / ph);
        double ar_loss = 4 / (PI * PI) * atan_diff * atan_diff;
        double alpha = U != 0 ? ar_loss / (1 - I / U + ar_loss + CIOU_EPSILON) : nan("");
        alpha_dw = alpha * 8 / (PI * PI) * atan_diff * ph;
        alpha_dh = alpha * -8 / (PI * PI) * atan_diff * pw;
    }
    double CC = C * C;
    bool spread = C != 0;
    double dd[4] = {spread ? (2 * (tx - px) * C - (2 * Cw * dCw_dx) * S) / CC : nan(""),
                    spread ? (2 * (ty - py) * C - (2 * Ch * dCh_dy) * S) / CC : nan(""),
                    spread ? (2 * Cw * dCw_dw) * S / CC + alpha_dw : nan(""),
                    spread ? (2 * Ch * dCh_dh) * S / CC + alpha_dh : nan("")};
    for (int k = 0; k < 4; ++k) d[k] = apart ? dd[k] : (C > 0 ? d[k] + dd[k] : d[k]);
}

// AlexeyabTruthDeltas.box_deltas for one event: what it adds to its cell's box delta, and the IoU
// and GIoU of prediction x (the cell's raw x, y, w, h) and truth t. The prediction's size is
// float, as get_yolo_box computes it with a float anchor.
__device__ void alexeyab_box(const double *x, const float *t, int i, int j, float aw, float ah,
                             int width, int height, float net_w, float net_h, int new_coords,
                             int iou_loss, double normalizer, double max_delta, double *delta,
                             double *iou, double *giou)
{
    float pw_f, ph_f;
    if (new_coords) {
        pw_f = (float)(x[2] * x[2] * 4) * aw / net_w;
        ph_f = (float)(x[3] * x[3] * 4) * ah / net_h;
    } else {
        pw_f = (float)exp(x[2]) * aw / net_w;
        ph_f = (float)exp(x[3]) * ah / net_h;
    }
    double px = (i + x[0]) / width, py = (j + x[1]) / height, pw = pw_f, ph = ph_f;
    double tx = t[0], ty = t[1], tw = t[2], th = t[3];
    *iou = iou_or_zero(px, py, pw, ph, tx, ty, tw, th);
    *giou = giou_of(px, py, pw, ph, tx, ty, tw, th);
    if (pw == 0) pw = 1.0;
    if (ph == 0) ph = 1.0;
    double scale = 2 - tw * th;
    if (iou_loss == MSE) {
        double wanted[4] = {tx * width - i, ty * height - j, 0.0, 0.0};
        if (new_coords) {
            wanted[2] = sqrt(tw * (double)net_w / (4 * (double)aw));
            wanted[3] = sqrt(th * (double)net_h / (4 * (double)ah));
        } else {
            wanted[2] = log(tw * (double)net_w / (double)aw);
            wanted[3] = log(th * (double)net_h / (double)ah);
        }
        for (int k = 0; k < 4; ++k) delta[k] = scale * (wanted[k] - x[k]) * normalizer;
        return;
    }
    dx_box_iou(px, py, pw, ph, tx, ty, tw, th, iou_loss, delta);
    if (!new_coords) {
        delta[2] *= exp(x[2]);
        delta[3] *= exp(x[3]);
    }
    for (int k = 0; k < 4; ++k) {
        double v = delta[k] * normalizer;
        if (!isfinite(v)) v = 0.0;
        if (max_delta != (double)FLT_MAX) v = fmin(fmax(v, -max_delta), max_delta);
        delta[k] = v;
    }
}

__device__ double smoothed(double target, double eps)
{
    return eps != 0 ? target * (1 - eps) + 0.5 * eps : target;
}

// AlexeyabTruthDeltas.class_delta on one cell: d its class entries, scores the output's (a plane
// apart), cls the truth's class
__device__ void alexeyab_class(float *d, const act_t *scores, size_t plane, int cls, int classes,
                               double eps, int focal, const double *multipliers,
                               double cls_normalizer)
{
    double o_cls = load(scores[cls * plane]);
    if (d[cls] != 0.f) {  // an earlier truth's class delta: only the truth's class entry
        double value = smoothed(1.0, eps) - o_cls;
        if (isfinite(value)) d[cls] = (float)value;
        if (multipliers) d[cls] = (float)((double)d[cls] * multipliers[cls]);
        return;
    }
    if (focal) {
        double pt = o_cls + 0.000000000000001;
        double grad = -(1 - pt) * (2 * pt * log(pt) + pt - 1);
        for (int k = 0; k < classes; ++k)
            d[k] = (float)(((k == cls ? 1.0 : 0.0) - (double)load(scores[k * plane])) * 0.5 * grad);
        return;
    }
    for (int k = 0; k < classes; ++k) {
        double value = smoothed(k == cls ? 1.0 : 0.0, eps) - (double)load(scores[k * plane]);
        if (isfinite(value)) d[k] = (float)value;
    }
    if (multipliers) d[cls] = (float)((double)d[cls] * (multipliers[cls] * cls_normalizer));
}

// numbers: iou_normalizer, obj_normalizer, cls_normalizer, max_delta, label_smooth_eps, then
// (with `multipliers`) the classes' multipliers. statistics (5 doubles, zeroed before):
// [1] += the touched cells' squared box deltas, [2] += 1 - IoU, [3] += 1 - GIoU, [4] += events
// ([0], the whole delta's squares, is sum_of_squares_kernel's, after this kernel).
// rows: the cells' delta rows (capacity x entries floats).
extern "C" __global__ void truth_events_kernel(act_t *delta, const act_t *out,
                                               const float *truths, const int *plan,
                                               const float *anchors, const double *numbers,
                                               float *rows, double *statistics, int capacity,
                                               int anchor_count, int entries, int height,
                                               int width, int truth_rows, float net_w,
                                               float net_h, int alexeyab, int iou_loss,
                                               int new_coords, int classes, int multipliers,
                                               int focal, int smooth, int average)
{
    int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= plan[0]) return;
    int key = plan[2 + u];
    int i = key % width, j = key / width % height, a = key / (width * height) % anchor_count;
    int b = key / (width * height * anchor_count);
    int first = plan[2 + capacity + u], last = plan[3 + capacity + u];
    const int *event_rows = plan + 3 + 2 * capacity;
    size_t plane = (size_t)height * width;
    size_t at = ((size_t)b * anchor_count * entries + (size_t)a * entries) * plane
                + (size_t)j * width + i;
    const act_t *o = out + at;
    float *d = rows + (size_t)u * entries;
    for (int e = 0; e < entries; ++e) d[e] = load(delta[at + e * plane]);
    double x[4];
    for (int k = 0; k < 4; ++k) x[k] = load(o[k * plane]);
    float aw = anchors[2 * a], ah = anchors[2 * a + 1];
    double iou_losses = 0.0, giou_losses = 0.0;
    for (int event = first; event < last; ++event) {
        const float *t = truths + ((size_t)b * truth_rows + event_rows[event]) * 5;
        int cls = (int)t[4];
        float o4 = load(o[4 * plane]);
        if (!alexeyab) {
            // delta_yolo_box, scaled by 2 - truth area; the size targets in float, as Darknet's
            double tw = t[2], th = t[3], scale = 2 - tw * th;
            double target[4] = {(double)t[0] * width - i, (double)t[1] * height - j,
                                (double)logf((float)(tw * (double)net_w) / aw),
                                (double)logf((float)(th * (double)net_h) / ah)};
            for (int k = 0; k < 4; ++k) d[k] = (float)(scale * (target[k] - x[k]));
            d[4] = 1.f - o4;
            // delta_yolo_class: where class 0's entry is already set, only the truth's class
            if (d[5] == 0.f)
                for (int k = 0; k < classes; ++k) d[5 + k] = -load(o[(5 + k) * plane]);
            if (cls >= 0 && cls < classes) d[5 + cls] = 1.f - load(o[(5 + cls) * plane]);
            continue;
        }
        const double *multiplier_of = multipliers ? numbers + 5 : 0;
        double mult = multipliers ? multiplier_of[cls] : 1.0;
        double box[4], iou, giou;
        alexeyab_box(x, t, i, j, aw, ah, width, height, net_w, net_h, new_coords, iou_loss,
                     numbers[0] * mult, numbers[3], box, &iou, &giou);
        iou_losses += 1 - iou;
        giou_losses += 1 - giou;
        for (int k = 0; k < 4; ++k) d[k] = (float)((double)d[k] + box[k]);  // accumulates
        double obj = numbers[1] * mult * (1 - (double)o4);
        if (!smooth || d[4] == 0.f) d[4] = (float)obj;
        alexeyab_class(d + 5, o + 5 * plane, plane, cls, classes, numbers[4], focal,
                       multiplier_of, numbers[2]);
    }
    if (alexeyab && average) {  // averages_yolo_deltas
        int marked = 0;
        for (int k = 0; k < classes; ++k) marked += d[5 + k] > 0.f;
        if (d[4] != 0.f && marked > 0)
            for (int k = 0; k < 4; ++k) d[k] = (float)((double)d[k] / marked);
    }
    double box_squares = 0.0;
    for (int k = 0; k < 4; ++k) box_squares += (double)d[k] * (double)d[k];
    for (int e = 0; e < entries; ++e) delta[at + e * plane] = store(d[e]);
    atomicAdd(statistics + 1, box_squares);
    atomicAdd(statistics + 2, iou_losses);
    atomicAdd(statistics + 3, giou_losses);
    atomicAdd(statistics + 4, (double)(last - first));
}
