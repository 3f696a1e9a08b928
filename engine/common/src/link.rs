//! Reading control-link frames (DESIGN.md §6) from a byte stream. Both ends of the link read
//! with this; the frames themselves are `roost_model::link`.

use roost_model::link::{frame_len, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a link frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The stream ended or failed.
    #[error("link stream: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix is over the link's limit or the body is not a frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The frame is longer than this reader accepts.
    #[error("link frame of {len} bytes exceeds {max}")]
    TooLarge { len: usize, max: usize },
}

/// Reads one length-prefixed frame's body, refusing one longer than `max` before allocating
/// for it.
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    recv: &mut R,
    max: usize,
) -> Result<Vec<u8>, LinkError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await?;
    let len = frame_len(prefix)?;
    if len > max {
        return Err(LinkError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_a_frame_and_refuses_an_oversized_one_before_reading_it() {
        let mut ok: &[u8] = &[3, 0, 0, 0, 7, 8, 9];
        assert_eq!(
            read_frame_body(&mut ok, 16).await.expect("frame"),
            vec![7, 8, 9]
        );
        let mut big: &[u8] = &[200, 0, 0, 0];
        assert!(matches!(
            read_frame_body(&mut big, 16).await,
            Err(LinkError::TooLarge { len: 200, max: 16 })
        ));
        let mut short: &[u8] = &[3, 0, 0, 0, 7];
        assert!(matches!(
            read_frame_body(&mut short, 16).await,
            Err(LinkError::Io(_))
        ));
    }
}
