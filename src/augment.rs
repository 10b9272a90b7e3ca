//! `--augment-shift P`: each training image moved by a whole-pixel offset (dx, dy), each in
//! [-P, P], zero-filled.
//!
//! The offsets are a counter-based draw: a pure function of (seed, epoch, position in the epoch's
//! order), so the CPU and the GPU compute the same batch, a resumed run draws what the
//! uninterrupted one would have, and nothing about it needs to be stored. It uses only 32-bit
//! integer arithmetic (xor, shifts, wrapping multiplies and adds, `%`), because WGSL has no 64-bit
//! integers: the gather kernel can draw in place from [`epoch_key`] (a uniform, computed once
//! per epoch on the host) and the position, and scripts/torch_reference.py replays it in Python.
//!
//! The draw, for n = 2P + 1 values:
//!
//! ```text
//! key   = mix32(mix32(mix32(mix32(DOMAIN ^ seed_lo) ^ seed_hi) ^ epoch_lo) ^ epoch_hi)
//! state = mix32(key ^ position)
//! word  = mix32(state += 0x9E3779B9)   (repeated: a Weyl sequence through the finaliser)
//! shift = word % n - P, the word rejected (and the next one drawn) if word >= 2^32 - 2^32 % n
//! dx is the first accepted word, dy the second.
//! ```
//!
//! The rejection keeps the n values exactly equally likely (2^32 is not a multiple of an odd
//! n > 1); it rejects a word with probability below n / 2^32, about once per 1,500 epochs of
//! MNIST at P = 27. For a fixed key, position -> state is a bijection, so no two positions of an
//! epoch share a stream.

/// Separates this draw's stream from any other use of the seed ("SHIF").
const AUGMENT_DOMAIN: u32 = 0x5348_4946;
/// 2^32 divided by the golden ratio, odd: SplitMix's increment, at 32 bits.
const WEYL_INCREMENT: u32 = 0x9E37_79B9;

/// The largest `max_shift` the draw accepts (so that 2P + 1 fits in 32 bits). Shifts of 28 or
/// more leave nothing of a 28x28 image; the command line is the place to refuse them.
pub const MAX_DRAWABLE_SHIFT: u32 = (1 << 31) - 1;

/// The largest `--augment-shift`: a shift of 28 pixels or more leaves nothing of a 28x28 image.
pub const MAX_AUGMENT_SHIFT: u32 = 27;

/// A bijective 32-bit finaliser: xorshift-multiply twice (the constants are Chris Wellons'
/// hash-prospector's low-bias pair), so that every input bit reaches every output bit.
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x21F0_AAAD);
    x ^= x >> 15;
    x = x.wrapping_mul(0x735A_2D97);
    x ^= x >> 15;
    x
}

/// The per-epoch part of the draw: one value for the whole epoch, the only input besides the
/// position (and P) that a GPU kernel needs.
pub fn epoch_key(seed: u64, epoch: u64) -> u32 {
    let mut key = mix32(AUGMENT_DOMAIN ^ seed as u32);
    key = mix32(key ^ (seed >> 32) as u32);
    key = mix32(key ^ epoch as u32);
    mix32(key ^ (epoch >> 32) as u32)
}

/// The offset (dx, dy) of the image at `position` of an epoch whose key is `key`; (0, 0) when
/// `max_shift` is 0. Panics if `max_shift` exceeds [`MAX_DRAWABLE_SHIFT`].
pub fn shift_from_key(key: u32, position: u32, max_shift: u32) -> (i32, i32) {
    assert!(max_shift <= MAX_DRAWABLE_SHIFT, "a shift of {max_shift} pixels cannot be drawn");
    if max_shift == 0 {
        return (0, 0);
    }
    let n = 2 * max_shift + 1;
    let mut state = mix32(key ^ position);
    let mut next_word = || {
        state = state.wrapping_add(WEYL_INCREMENT);
        mix32(state)
    };
    let dx = uniform_below(&mut next_word, n) as i64 - i64::from(max_shift);
    let dy = uniform_below(&mut next_word, n) as i64 - i64::from(max_shift);
    (dx as i32, dy as i32)
}

/// The offset of the image at `position` (0-based, in the order the epoch visits its images) of
/// epoch `epoch` (0-based) of a run seeded with `seed`, each coordinate in [-max_shift, max_shift].
pub fn shift_for(seed: u64, epoch: u64, position: u32, max_shift: u32) -> (i32, i32) {
    shift_from_key(epoch_key(seed, epoch), position, max_shift)
}

/// The (dx, dy) pairs, flat as [`crate::backend::Chunk::shifts`] holds them, of the `count` images
/// at positions `first..first + count` of epoch `epoch`'s order.
pub fn shifts_for_positions(seed: u64, epoch: u64, first: usize, count: usize, max_shift: u32) -> Vec<i32> {
    if max_shift == 0 {
        return vec![0; 2 * count];
    }
    let key = epoch_key(seed, epoch);
    let position = |i: usize| u32::try_from(first + i).expect("an epoch has fewer than 2^32 images");
    (0..count)
        .flat_map(|i| {
            let (dx, dy) = shift_from_key(key, position(i), max_shift);
            [dx, dy]
        })
        .collect()
}

/// A value uniform in 0..n from uniform 32-bit words: the first word below the largest multiple
/// of n that fits (2^32 - 2^32 % n), reduced mod n.
fn uniform_below(next_word: &mut impl FnMut() -> u32, n: u32) -> u32 {
    let excess = (u32::MAX % n + 1) % n; // 2^32 mod n
    loop {
        let word = next_word();
        if word <= u32::MAX - excess {
            return word % n;
        }
    }
}

/// `dst` = `src` (both `side` x `side`, row-major) moved by (dx, dy) whole pixels, zero-filled:
/// `dst[y][x] = src[y - dy][x - dx]` where that lies inside the image, else zero (`T::default()`).
/// So +dx moves the content right and +dy moves it down; |dx| or |dy| >= side leaves all zeros.
pub fn shift_image<T: Copy + Default>(dst: &mut [T], src: &[T], side: usize, dx: i32, dy: i32) {
    assert_eq!(src.len(), side * side, "source is not {side}x{side}");
    assert_eq!(dst.len(), side * side, "destination is not {side}x{side}");
    dst.fill(T::default());
    let (dx, dy) = (dx as i64, dy as i64);
    let side_signed = side as i64;
    if dx.abs() >= side_signed || dy.abs() >= side_signed {
        return;
    }
    // Columns dst_x0 .. dst_x0 + width of the destination come from src_x0 .. of the source.
    let width = (side_signed - dx.abs()) as usize;
    let (dst_x0, src_x0) = if dx >= 0 { (dx as usize, 0) } else { (0, (-dx) as usize) };
    for y in dy.max(0)..(side_signed + dy).min(side_signed) {
        let (dst_row, src_row) = (y as usize * side, (y - dy) as usize * side);
        dst[dst_row + dst_x0..dst_row + dst_x0 + width]
            .copy_from_slice(&src[src_row + src_x0..src_row + src_x0 + width]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIDE: usize = 28;

    /// A 28x28 image with no zero pixel and no two pixels alike in a row or column pattern.
    fn test_image() -> Vec<u8> {
        (0..SIDE * SIDE).map(|i| (mix32(i as u32) % 255 + 1) as u8).collect()
    }

    fn shifted(src: &[u8], dx: i32, dy: i32) -> Vec<u8> {
        let mut dst = vec![0xAA; src.len()]; // poisoned: every pixel must be written
        shift_image(&mut dst, src, SIDE, dx, dy);
        dst
    }

    #[test]
    fn shift_image_is_its_definition_for_every_offset() {
        let src = test_image();
        for dy in -29..=29 {
            for dx in -29..=29 {
                let dst = shifted(&src, dx, dy);
                for y in 0..SIDE as i32 {
                    for x in 0..SIDE as i32 {
                        let (sy, sx) = (y - dy, x - dx);
                        let inside = (0..SIDE as i32).contains(&sy) && (0..SIDE as i32).contains(&sx);
                        let expected = if inside { src[sy as usize * SIDE + sx as usize] } else { 0 };
                        assert_eq!(
                            dst[y as usize * SIDE + x as usize],
                            expected,
                            "({dx}, {dy}) at ({x}, {y})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn zero_shift_is_the_identity_and_positive_moves_right_and_down() {
        let src = test_image();
        assert_eq!(shifted(&src, 0, 0), src);
        let dst = shifted(&src, 1, 2);
        assert_eq!(dst[2 * SIDE + 1], src[0]);
        assert!(dst[..2 * SIDE].iter().all(|&p| p == 0), "the top two rows are vacated");
        assert!((0..SIDE).all(|y| dst[y * SIDE] == 0), "the left column is vacated");
        assert!(dst[2 * SIDE + 1..].chunks(SIDE).all(|row| row.iter().take(SIDE - 1).all(|&p| p != 0)));
    }

    #[test]
    fn a_shift_and_its_inverse_restore_the_interior_and_zero_the_border() {
        let src = test_image();
        for (dx, dy) in [(2, -1), (-2, 2), (1, 1), (-3, -3), (27, 0), (0, -27)] {
            let back = shifted(&shifted(&src, dx, dy), -dx, -dy);
            for y in 0..SIDE {
                for x in 0..SIDE {
                    // The pixels the round trip keeps are those whose shifted place is inside.
                    let kept = (0..SIDE as i32).contains(&(x as i32 + dx))
                        && (0..SIDE as i32).contains(&(y as i32 + dy));
                    let expected = if kept { src[y * SIDE + x] } else { 0 };
                    assert_eq!(back[y * SIDE + x], expected, "({dx}, {dy}) at ({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn extreme_shifts_keep_one_edge_and_larger_ones_keep_nothing() {
        let src = test_image();
        let right = shifted(&src, 27, 0);
        assert!((0..SIDE).all(|y| right[y * SIDE + 27] == src[y * SIDE]));
        assert_eq!(right.iter().filter(|&&p| p != 0).count(), SIDE);
        let up = shifted(&src, 0, -27);
        assert_eq!(up[..SIDE], src[27 * SIDE..]);
        assert!(shifted(&src, 28, 0).iter().chain(&shifted(&src, 0, -28)).all(|&p| p == 0));
        assert!(shifted(&src, i32::MIN, i32::MAX).iter().all(|&p| p == 0));
        // f32 pixels shift the same way.
        let float_src: Vec<f32> = src.iter().map(|&p| f32::from(p) / 255.0).collect();
        let mut float_dst = vec![f32::NAN; SIDE * SIDE];
        shift_image(&mut float_dst, &float_src, SIDE, -2, 2);
        let expected: Vec<f32> = shifted(&src, -2, 2).iter().map(|&p| f32::from(p) / 255.0).collect();
        assert_eq!(float_dst, expected);
    }

    #[test]
    fn draws_cover_the_range_evenly_and_reach_the_extremes() {
        for max_shift in [1u32, 2, 3] {
            let n = (2 * max_shift + 1) as usize;
            let mut counts = vec![[0usize; 2]; n];
            let draws = 60_000;
            let key = epoch_key(0, 0);
            for position in 0..draws {
                let (dx, dy) = shift_from_key(key, position, max_shift);
                counts[(dx + max_shift as i32) as usize][0] += 1;
                counts[(dy + max_shift as i32) as usize][1] += 1;
            }
            // Each count is binomial(60000, 1/n): within 5 standard deviations of its mean.
            let mean = draws as f64 / n as f64;
            let sd = (mean * (1.0 - 1.0 / n as f64)).sqrt();
            for (value, [x, y]) in counts.iter().enumerate() {
                for count in [x, y] {
                    assert!(
                        (*count as f64 - mean).abs() < 5.0 * sd,
                        "P={max_shift}: {value} drawn {count} times"
                    );
                }
            }
        }
        assert_eq!(shift_for(5, 5, 5, 0), (0, 0));
    }

    #[test]
    fn draws_depend_on_every_part_of_the_key() {
        let stream = |seed: u64, epoch: u64| -> Vec<(i32, i32)> {
            (0..64).map(|position| shift_for(seed, epoch, position, 2)).collect()
        };
        let base = stream(1, 1);
        assert_eq!(base, stream(1, 1));
        for other in [stream(2, 1), stream(1, 2), stream(1 << 32 | 1, 1), stream(1, 1 << 32 | 1)] {
            assert_ne!(base, other);
        }
        assert_ne!(base[..32], base[32..]);
        assert!(base.iter().any(|(dx, dy)| dx != dy));
    }

    #[test]
    fn a_word_in_the_biased_tail_is_rejected() {
        // n = 3: 2^32 % 3 = 1, so u32::MAX is the one word rejected.
        let mut words = [u32::MAX, u32::MAX, 7].into_iter();
        assert_eq!(uniform_below(&mut || words.next().unwrap(), 3), 1);
        let mut words = [u32::MAX - 1].into_iter();
        assert_eq!(uniform_below(&mut || words.next().unwrap(), 3), (u32::MAX - 1) % 3);
        let mut words = [u32::MAX].into_iter();
        assert_eq!(uniform_below(&mut || words.next().unwrap(), 1), 0);
    }

    #[test]
    fn mix32_is_a_bijection_on_a_sample() {
        let mut seen: Vec<u32> = (0..1 << 16).map(|i: u32| mix32(i << 16 | i)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 1 << 16);
    }
}
