//! Adam on host vectors, with gradient-norm clipping: the trainable state is a few tens of thousands of
//! numbers, so the update is cheap and easy to checkpoint exactly.

use std::collections::BTreeMap;

use t2_model::ProjId;

pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Updates taken so far (bias correction).
    pub t: u64,
    pub m: BTreeMap<ProjId, Vec<f32>>,
    pub v: BTreeMap<ProjId, Vec<f32>>,
}

impl Adam {
    pub fn new(lr: f64, shapes: &BTreeMap<ProjId, Vec<f32>>) -> Self {
        let zeros: BTreeMap<_, _> = shapes
            .iter()
            .map(|(k, p)| (*k, vec![0f32; p.len()]))
            .collect();
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
            m: zeros.clone(),
            v: zeros,
        }
    }

    /// One update of `params` in place.
    pub fn step(
        &mut self,
        params: &mut BTreeMap<ProjId, Vec<f32>>,
        grads: &BTreeMap<ProjId, Vec<f32>>,
    ) {
        self.t += 1;
        let c1 = 1.0 - self.beta1.powi(self.t as i32);
        let c2 = 1.0 - self.beta2.powi(self.t as i32);
        for (id, p) in params.iter_mut() {
            let (Some(g), Some(m), Some(v)) =
                (grads.get(id), self.m.get_mut(id), self.v.get_mut(id))
            else {
                continue;
            };
            for i in 0..p.len() {
                let gi = g[i] as f64;
                let mi = self.beta1 * m[i] as f64 + (1.0 - self.beta1) * gi;
                let vi = self.beta2 * v[i] as f64 + (1.0 - self.beta2) * gi * gi;
                m[i] = mi as f32;
                v[i] = vi as f32;
                let update = self.lr * (mi / c1) / ((vi / c2).sqrt() + self.eps);
                p[i] = (p[i] as f64 - update) as f32;
            }
        }
    }
}

/// The global L2 norm of all gradients, and the gradients scaled down to `max_norm` when above it.
pub fn clip_grad_norm(grads: &mut BTreeMap<ProjId, Vec<f32>>, max_norm: f64) -> f64 {
    let norm = grads
        .values()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let k = (max_norm / norm) as f32;
        grads
            .values_mut()
            .flat_map(|g| g.iter_mut())
            .for_each(|x| *x *= k);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use t2_model::ProjKind;

    fn one(v: Vec<f32>) -> BTreeMap<ProjId, Vec<f32>> {
        BTreeMap::from([(
            ProjId {
                layer: 0,
                kind: ProjKind::Up,
            },
            v,
        )])
    }

    #[test]
    fn adam_minimizes_a_quadratic() {
        // f(p) = Σ (p - 3)²: Adam with lr 0.1 must get close to 3 from 0.
        let mut p = one(vec![0.0, 10.0]);
        let mut opt = Adam::new(0.1, &p);
        for _ in 0..500 {
            let g = one(p
                .values()
                .next()
                .unwrap()
                .iter()
                .map(|x| 2.0 * (x - 3.0))
                .collect());
            opt.step(&mut p, &g);
        }
        for x in p.values().next().unwrap() {
            assert!((x - 3.0).abs() < 0.05, "{x}");
        }
    }

    #[test]
    fn first_adam_step_moves_each_parameter_by_lr() {
        // Bias correction makes the first step exactly lr·sign(g) (up to eps).
        let mut p = one(vec![1.0, 1.0]);
        let mut opt = Adam::new(0.01, &p);
        opt.step(&mut p, &one(vec![0.5, -2e-5]));
        let v = &p.values().next().unwrap();
        assert!(
            (v[0] - 0.99).abs() < 1e-6 && (v[1] - 1.01).abs() < 1e-4,
            "{v:?}"
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = one(vec![3.0, 4.0]);
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        let v = g.values().next().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut small = one(vec![0.1]);
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small.values().next().unwrap()[0], 0.1);
    }
}
