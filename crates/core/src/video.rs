//! Which frames of a video the model sees: transformers'
//! `InternVLVideoProcessor.sample_frames`, for frames a client decoded and
//! for video files the service decodes.

use crate::error::EngineError;

/// Frames sampled when a request sets neither `num_frames` nor `fps` (the
/// service's default; a shorter video gives every frame).
pub const DEFAULT_FRAMES: u32 = 8;

/// How a request asks for frames: `num_frames` and `fps` as the proto's
/// `Video` carries them (0 = unset).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Frames to sample, 0 = unset.
    pub num_frames: u32,
    /// Frames to sample per second of video, 0 = unset.
    pub fps: f32,
}

impl Sampling {
    /// Checks what does not depend on the video: the two are exclusive, as
    /// in the reference, and `fps` is a finite positive number or unset.
    /// `field` is the video's path (`….video`).
    pub fn check(&self, field: &str) -> Result<(), EngineError> {
        if !self.fps.is_finite() || self.fps < 0.0 {
            return Err(EngineError::invalid(
                format!("{field}.fps"),
                "must be a finite, non-negative number",
            ));
        }
        if self.num_frames > 0 && self.fps > 0.0 {
            return Err(EngineError::invalid(
                format!("{field}.fps"),
                "num_frames and fps are mutually exclusive (as in transformers' \
                 InternVLVideoProcessor); set one",
            ));
        }
        Ok(())
    }

    /// The indices, in `0..total`, of the frames the reference samples from a
    /// video of `total` frames at `source_fps` frames per second (`None` for
    /// frames a client sent, which carry no rate), at most `max` of them.
    ///
    /// `total` is what a container claims, and a 2 KB file can claim two
    /// billion frames: the count is compared with `max` before the list is
    /// made, so what a file claims never sizes an allocation.
    ///
    /// The reference computes `torch.arange(shift, total, total / n).int()`
    /// with `shift = total / n / 2`: the bounds in double precision, each
    /// value rounded to float32, then truncated. That is reproduced here,
    /// float32 step included, so the indices are equal, not merely close.
    pub fn indices(
        &self,
        total: usize,
        source_fps: Option<f64>,
        max: usize,
        field: &str,
    ) -> Result<Vec<usize>, EngineError> {
        self.check(field)?;
        if total == 0 {
            return Err(EngineError::invalid(field, "the video has no frames"));
        }
        let (n, asked) = if self.fps > 0.0 {
            let Some(rate) = source_fps.filter(|r| r.is_finite() && *r > 0.0) else {
                return Err(EngineError::invalid(
                    format!("{field}.fps"),
                    "sampling by fps needs the video's frame rate: send the video \
                     file (data or url), or num_frames with decoded frames",
                ));
            };
            // Python's int(): truncation toward zero.
            let n = (total as f64 / rate * f64::from(self.fps)).trunc();
            if n < 1.0 {
                return Err(EngineError::invalid(
                    format!("{field}.fps"),
                    format!(
                        "{} frames per second of a {:.3} s video is no frame",
                        self.fps,
                        total as f64 / rate
                    ),
                ));
            }
            (n.min(usize::MAX as f64) as usize, "fps")
        } else if self.num_frames > 0 {
            (self.num_frames as usize, "num_frames")
        } else {
            ((DEFAULT_FRAMES as usize).min(total), "num_frames")
        };
        if n > total {
            return Err(EngineError::invalid(
                format!("{field}.{asked}"),
                format!("asks for {n} frames; the video has {total}"),
            ));
        }
        if n > max {
            return Err(EngineError::invalid(
                format!("{field}.{asked}"),
                format!("samples {n} frames; at most {max} per request (max_images_per_request)"),
            ));
        }
        let step = total as f64 / n as f64;
        let shift = step / 2.0;
        let len = ((total as f64 - shift) / step).ceil() as usize;
        Ok((0..len)
            .map(|i| (shift + step * i as f64) as f32 as usize)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(num_frames: u32) -> Sampling {
        Sampling {
            num_frames,
            fps: 0.0,
        }
    }

    fn per_second(fps: f32) -> Sampling {
        Sampling { num_frames: 0, fps }
    }

    #[test]
    fn the_fixture_case_is_the_references() {
        // tests/fixtures/tiny-internvl/reference.json: 16 frames at 4 fps,
        // 8 sampled by transformers.
        let want = vec![1, 3, 5, 7, 9, 11, 13, 15];
        assert_eq!(frames(8).indices(16, None, 1024, "v").unwrap(), want);
        assert_eq!(frames(0).indices(16, None, 1024, "v").unwrap(), want);
        // 2 frames per second of a 4-second video is the same 8.
        assert_eq!(
            per_second(2.0).indices(16, Some(4.0), 1024, "v").unwrap(),
            want
        );
    }

    #[test]
    fn uneven_steps_truncate_as_the_reference() {
        // arange(10/3/2, 10, 10/3) = [1.667, 5.0, 8.333] -> [1, 5, 8].
        assert_eq!(
            frames(3).indices(10, None, 1024, "v").unwrap(),
            vec![1, 5, 8]
        );
        // Every frame: shift 0.5, step 1.
        assert_eq!(
            frames(5).indices(5, None, 1024, "v").unwrap(),
            vec![0, 1, 2, 3, 4]
        );
        // 30 frames at 30 fps, 1 per second: N = int(1.0 * 1) = 1, frame 15.
        assert_eq!(
            per_second(1.0).indices(30, Some(30.0), 1024, "v").unwrap(),
            vec![15]
        );
        // 100 frames at 29.97 fps, 2.5 per second: N = int(8.34) = 8.
        let got = per_second(2.5)
            .indices(100, Some(29.97), 1024, "v")
            .unwrap();
        assert_eq!(got, vec![6, 18, 31, 43, 56, 68, 81, 93]);
    }

    #[test]
    fn a_short_video_gives_every_frame_by_default() {
        assert_eq!(
            frames(0).indices(3, None, 1024, "v").unwrap(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn what_the_reference_refuses_is_refused_naming_the_field() {
        let field = |e: EngineError| match e {
            EngineError::InvalidArgument { field, .. } => field,
            other => panic!("{other:?}"),
        };
        let both = Sampling {
            num_frames: 4,
            fps: 1.0,
        };
        assert_eq!(
            field(both.indices(16, Some(4.0), 1024, "v").unwrap_err()),
            "v.fps"
        );
        assert_eq!(
            field(frames(17).indices(16, None, 1024, "v").unwrap_err()),
            "v.num_frames"
        );
        // 8 per second of a 16-frame, 4 fps video is 32 frames: too many.
        assert_eq!(
            field(
                per_second(8.0)
                    .indices(16, Some(4.0), 1024, "v")
                    .unwrap_err()
            ),
            "v.fps"
        );
        // Decoded frames carry no rate.
        assert_eq!(
            field(per_second(1.0).indices(16, None, 1024, "v").unwrap_err()),
            "v.fps"
        );
        // Less than one frame.
        assert_eq!(
            field(
                per_second(0.1)
                    .indices(16, Some(4.0), 1024, "v")
                    .unwrap_err()
            ),
            "v.fps"
        );
        assert_eq!(
            field(frames(1).indices(0, None, 1024, "v").unwrap_err()),
            "v"
        );
        // More than the caller takes: refused by count, naming what asked.
        assert_eq!(
            field(frames(9).indices(16, None, 8, "v").unwrap_err()),
            "v.num_frames"
        );
        for bad in [f32::NAN, f32::INFINITY, -1.0] {
            assert_eq!(field(per_second(bad).check("v").unwrap_err()), "v.fps");
        }
    }

    #[test]
    fn a_claimed_frame_count_sizes_no_allocation() {
        // A container claiming two billion frames sampled at its own rate:
        // two billion indices (16 GB) before this check existed.
        let claimed = 2_000_000_000;
        let err = per_second(25.0)
            .indices(claimed, Some(25.0), 1024, "v")
            .unwrap_err();
        assert!(matches!(
            err,
            EngineError::InvalidArgument { ref field, .. } if field == "v.fps"
        ));
        // Within the limit the same claim still samples as the reference.
        // 2^-17 frames per second (exact in f32) of 80,000,000 s: 610.
        let few = per_second(1.0 / 131_072.0).indices(claimed, Some(25.0), 1024, "v");
        assert_eq!(few.unwrap().len(), 610);
    }
}
