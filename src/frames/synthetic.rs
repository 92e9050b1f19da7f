//! CarRacing-like 96x96 frames with no simulator: green grass, a grey road
//! that curves as the viewpoint moves, red-and-white curbs, the red car, and
//! the black dashboard strip (rows 84..96, which preprocessing crops).
//!
//! For demos and benchmarks that must run without Python. Deterministic in
//! (episode, step); pure computation, no I/O.

/// Side of a rendered frame, as CarRacing's.
pub const SIDE: usize = 96;
/// First row of the dashboard strip.
const DASHBOARD_ROW: usize = 84;

const GRASS: [u8; 3] = [102, 204, 102];
const GRASS_DARK: [u8; 3] = [102, 229, 102];
const ROAD: [u8; 3] = [107, 107, 107];
const CURB_RED: [u8; 3] = [255, 0, 0];
const CURB_WHITE: [u8; 3] = [255, 255, 255];
const CAR: [u8; 3] = [204, 0, 0];

/// One frame: 96 x 96 x 3 uint8, row-major HWC.
pub fn render(episode: u64, step: u64) -> Vec<u8> {
    let mut px = vec![0u8; SIDE * SIDE * 3];
    // The track: its centre line drifts with a few slow sines that depend on
    // the episode, and scrolls towards the car as the step grows.
    let phase = episode as f64 * 1.7;
    let t = step as f64 * 0.35;
    let half_width = 12.0 + 3.0 * (phase + t * 0.05).sin();
    for y in 0..DASHBOARD_ROW {
        let depth = (DASHBOARD_ROW - y) as f64; // distance ahead of the car
        let along = t + depth * 0.12;
        let centre = SIDE as f64 / 2.0
            + 18.0 * (along * 0.21 + phase).sin() * (depth / DASHBOARD_ROW as f64)
            + 6.0 * (along * 0.05 + phase * 0.5).sin();
        for x in 0..SIDE {
            let offset = (x as f64 - centre).abs();
            let colour = if offset < half_width {
                ROAD
            } else if offset < half_width + 2.0 {
                if ((along * 2.0) as i64).rem_euclid(2) == 0 {
                    CURB_RED
                } else {
                    CURB_WHITE
                }
            } else if (((x as f64 + t * 3.0) / 8.0) as i64 + ((y as f64 + t * 9.0) / 8.0) as i64) % 2 == 0 {
                GRASS
            } else {
                GRASS_DARK
            };
            px[(y * SIDE + x) * 3..][..3].copy_from_slice(&colour);
        }
    }
    // The car, fixed near the bottom centre as in CarRacing.
    for y in 66..76 {
        for x in 46..50 {
            px[(y * SIDE + x) * 3..][..3].copy_from_slice(&CAR);
        }
    }
    // Dashboard: black, with a speed bar that varies.
    let speed = ((step as f64 * 0.1 + phase).sin().abs() * 30.0) as usize;
    for y in 88..92 {
        for x in 10..10 + speed {
            px[(y * SIDE + x) * 3..][..3].copy_from_slice(&CURB_WHITE);
        }
    }
    px
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_deterministic_and_move() {
        assert_eq!(render(1, 5), render(1, 5));
        assert_ne!(render(1, 5), render(1, 6));
        assert_ne!(render(1, 5), render(2, 5));
        let f = render(0, 0);
        assert_eq!(f.len(), SIDE * SIDE * 3);
        let road = f.chunks(3).filter(|p| *p == ROAD).count();
        assert!(road > 1000, "only {road} road pixels");
    }
}
