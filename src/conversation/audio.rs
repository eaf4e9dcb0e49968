//! Audio made ready for a model that hears.
//!
//! OpenRouter passes an `input_audio` part's format through to the
//! provider, and providers differ: every audio model takes WAV and MP3,
//! but OpenAI's take nothing else. Discord's voice messages are Ogg/Opus,
//! so those are decoded and sent as 16 kHz mono WAV (what speech models
//! work at); other formats are sent as they are.

use std::io::Cursor;
use std::time::Duration;

use base64::Engine as _;
use opus_pure::{MAX_PACKET_SAMPLES, OggOpusReader, Trim};

use super::AudioPart;

/// Decoded audio longer than this is refused: an Opus file is small for
/// its length, so the size cap alone does not bound what it decodes to.
pub const LONGEST_AUDIO: Duration = Duration::from_secs(30 * 60);

/// The rate voice is decoded at, in samples per second.
const SPEECH_RATE: u32 = 16_000;

/// Why a voice note could not be made ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AudioError {
    #[error("it is not a playable Ogg Opus file ({0})")]
    Undecodable(String),
    #[error("it is longer than {} minutes", LONGEST_AUDIO.as_secs() / 60)]
    TooLong,
}

/// The part to send for audio of `format` (as OpenRouter names formats).
/// CPU-bound for Ogg: call it off the async threads.
pub fn audio_part(format: &str, bytes: &[u8]) -> Result<AudioPart, AudioError> {
    let (format, bytes) = match format {
        "ogg" => ("wav", ogg_to_wav(bytes)?),
        other => (other, bytes.to_vec()),
    };
    Ok(AudioPart {
        format: format.to_owned(),
        data: base64::engine::general_purpose::STANDARD.encode(bytes),
    })
}

/// Ogg/Opus decoded to 16-bit mono WAV at [`SPEECH_RATE`], trimmed as the
/// file's header says (pre-skip and end trim), channels mixed down.
fn ogg_to_wav(ogg: &[u8]) -> Result<Vec<u8>, AudioError> {
    let undecodable = |e: opus_pure::Error| AudioError::Undecodable(e.to_string());
    let rate = SPEECH_RATE as i32;
    let mut reader = OggOpusReader::new(Cursor::new(ogg)).map_err(undecodable)?;
    let channels = usize::from(reader.head().channel_count).max(1);
    let mut decoder = reader.head().decoder(rate).map_err(undecodable)?;
    let mut trim = Trim::new(reader.head(), rate, channels).map_err(undecodable)?;
    let longest = LONGEST_AUDIO.as_secs() as usize * SPEECH_RATE as usize;
    let mut block = vec![0.0f32; MAX_PACKET_SAMPLES * channels];
    let mut mono: Vec<i16> = Vec::new();
    // What is decoded counts too: a file whose pages say to keep nothing
    // would otherwise be decoded to its end however long it is.
    let mut decoded_total = 0usize;
    for packet in reader.packets() {
        let packet = packet.map_err(undecodable)?;
        let decoded = decoder
            .decode(&packet.data, MAX_PACKET_SAMPLES, &mut block)
            .map_err(undecodable)?;
        decoded_total += decoded;
        if decoded_total > longest + longest / 10 {
            return Err(AudioError::TooLong);
        }
        let kept = trim.keep(&packet, &block[..decoded * channels]);
        mono.extend(kept.chunks_exact(channels).map(|frame| {
            let mixed = frame.iter().sum::<f32>() / channels as f32;
            (mixed.clamp(-1.0, 1.0) * f32::from(i16::MAX)) as i16
        }));
        if mono.len() > longest {
            return Err(AudioError::TooLong);
        }
    }
    if mono.is_empty() {
        return Err(AudioError::Undecodable("it holds no sound".to_owned()));
    }
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SPEECH_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut wav = Cursor::new(Vec::with_capacity(44 + mono.len() * 2));
    let written = (|| {
        let mut writer = hound::WavWriter::new(&mut wav, spec)?;
        let mut samples = writer.get_i16_writer(mono.len() as u32);
        for sample in &mono {
            samples.write_sample(*sample);
        }
        samples.flush()?;
        writer.finalize()
    })();
    written.map_err(|e| AudioError::Undecodable(e.to_string()))?;
    Ok(wav.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two seconds of a 440 Hz tone at half scale, mono, as Opus in Ogg.
    const VOICE: &[u8] = include_bytes!("../../tests/fixtures/voice-message.ogg");

    fn wav_of(part: &AudioPart) -> (hound::WavSpec, Vec<i16>) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&part.data)
            .unwrap();
        let reader = hound::WavReader::new(Cursor::new(bytes)).unwrap();
        let spec = reader.spec();
        (spec, reader.into_samples().map(Result::unwrap).collect())
    }

    #[test]
    fn ogg_opus_becomes_mono_speech_rate_wav_of_the_same_length_and_sound() {
        let part = audio_part("ogg", VOICE).unwrap();
        assert_eq!(part.format, "wav");
        let (spec, samples) = wav_of(&part);
        assert_eq!((spec.channels, spec.sample_rate), (1, SPEECH_RATE));
        let seconds = samples.len() as f32 / SPEECH_RATE as f32;
        assert!((seconds - 2.0).abs() < 0.05, "{seconds} s");
        let middle = &samples[samples.len() / 4..samples.len() * 3 / 4];
        let rms = (middle.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / middle.len() as f64)
            .sqrt();
        // A 0.5 sine has an RMS of about 0.35 of full scale.
        assert!(rms > 8_000.0 && rms < 14_000.0, "rms {rms}");
    }

    #[test]
    fn formats_every_audio_model_takes_are_sent_as_they_are() {
        let part = audio_part("mp3", b"ID3 not really").unwrap();
        assert_eq!(part.format, "mp3");
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&part.data)
                .unwrap(),
            b"ID3 not really"
        );
    }

    #[test]
    fn a_file_that_is_not_ogg_opus_is_refused_with_the_reason() {
        let error = audio_part("ogg", b"OggS but then nothing sensible").unwrap_err();
        assert!(matches!(error, AudioError::Undecodable(_)), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with("it is not a playable Ogg Opus file")
        );
    }
}
