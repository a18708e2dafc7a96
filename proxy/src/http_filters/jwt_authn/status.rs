//! Why a JWT was not accepted: jwt_verify_lib's statuses, whose messages
//! Envoy sends as the 401/403 body and folds into the response details.

/// A verification outcome other than success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Status {
    #[error("Jwt is missing")]
    JwtMissed,
    #[error("Jwt not yet valid")]
    JwtNotYetValid,
    #[error("Jwt is expired")]
    JwtExpired,
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    JwtBadFormat,
    #[error("Jwt header is an invalid Base64url encoded")]
    JwtHeaderParseErrorBadBase64,
    #[error("Jwt header is an invalid JSON")]
    JwtHeaderParseErrorBadJson,
    #[error("Jwt header [alg] field is required and must be a string")]
    JwtHeaderBadAlg,
    #[error("Jwt header [alg] is not supported")]
    JwtHeaderNotImplementedAlg,
    #[error("Jwt header [kid] field is not a string")]
    JwtHeaderBadKid,
    #[error("Jwt payload is an invalid Base64url encoded")]
    JwtPayloadParseErrorBadBase64,
    #[error("Jwt payload is an invalid JSON")]
    JwtPayloadParseErrorBadJson,
    #[error("Jwt payload [iss] field is not a string")]
    JwtPayloadParseErrorIssNotString,
    #[error("Jwt payload [sub] field is not a string")]
    JwtPayloadParseErrorSubNotString,
    #[error("Jwt payload [iat] field is not an integer")]
    JwtPayloadParseErrorIatNotInteger,
    #[error("Jwt payload [iat] field is not a positive 64 bit integer")]
    JwtPayloadParseErrorIatOutOfRange,
    #[error("Jwt payload [nbf] field is not an integer")]
    JwtPayloadParseErrorNbfNotInteger,
    #[error("Jwt payload [nbf] field is not a positive 64 bit integer")]
    JwtPayloadParseErrorNbfOutOfRange,
    #[error("Jwt payload [exp] field is not an integer")]
    JwtPayloadParseErrorExpNotInteger,
    #[error("Jwt payload [exp] field is not a positive 64 bit integer")]
    JwtPayloadParseErrorExpOutOfRange,
    #[error("Jwt payload [jti] field is not a string")]
    JwtPayloadParseErrorJtiNotString,
    #[error("Jwt payload [aud] field is not a string or string list")]
    JwtPayloadParseErrorAudNotString,
    #[error("Jwt signature is an invalid Base64url encoded")]
    JwtSignatureParseErrorBadBase64,
    #[error("Jwt ED25519 signature is wrong length")]
    JwtEd25519SignatureWrongLength,
    #[error("Jwt issuer is not configured")]
    JwtUnknownIssuer,
    #[error("Audiences in Jwt are not allowed")]
    JwtAudienceNotAllowed,
    #[error("Jwt verification fails")]
    JwtVerificationFail,
    #[error("Jwks is an invalid JSON")]
    JwksParseError,
    #[error("Jwks does not have [keys] field")]
    JwksNoKeys,
    #[error("[keys] in Jwks is not an array")]
    JwksBadKeys,
    #[error("Jwks doesn't have any valid public key")]
    JwksNoValidKeys,
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    JwksKidAlgMismatch,
    #[error("Jwks remote fetch is failed")]
    JwksFetchFail,
}

impl Status {
    /// jwt_verify_lib's number for the status (`failed_status_in_metadata`).
    pub fn code(self) -> u32 {
        use Status::*;
        match self {
            JwtMissed => 1,
            JwtNotYetValid => 2,
            JwtExpired => 3,
            JwtBadFormat => 4,
            JwtHeaderParseErrorBadBase64 => 5,
            JwtHeaderParseErrorBadJson => 6,
            JwtHeaderBadAlg => 7,
            JwtHeaderNotImplementedAlg => 8,
            JwtHeaderBadKid => 9,
            JwtPayloadParseErrorBadBase64 => 10,
            JwtPayloadParseErrorBadJson => 11,
            JwtPayloadParseErrorIssNotString => 12,
            JwtPayloadParseErrorSubNotString => 13,
            JwtPayloadParseErrorIatNotInteger => 14,
            JwtPayloadParseErrorIatOutOfRange => 15,
            JwtPayloadParseErrorNbfNotInteger => 16,
            JwtPayloadParseErrorNbfOutOfRange => 17,
            JwtPayloadParseErrorExpNotInteger => 18,
            JwtPayloadParseErrorExpOutOfRange => 19,
            JwtPayloadParseErrorJtiNotString => 20,
            JwtPayloadParseErrorAudNotString => 21,
            JwtSignatureParseErrorBadBase64 => 22,
            JwtEd25519SignatureWrongLength => 23,
            JwtUnknownIssuer => 24,
            JwtAudienceNotAllowed => 25,
            JwtVerificationFail => 26,
            JwksParseError => 28,
            JwksNoKeys => 29,
            JwksBadKeys => 30,
            JwksNoValidKeys => 31,
            JwksKidAlgMismatch => 32,
            JwksFetchFail => 40,
        }
    }

    /// Envoy's response code details: `jwt_authn_access_denied{<message
    /// with each space as an underscore>}`.
    pub fn details(self) -> String {
        details(&self.to_string())
    }
}

/// `jwt_authn_access_denied{<message>}`, each whitespace character of
/// the message an underscore.
pub fn details(message: &str) -> String {
    let m: String = message
        .chars()
        .map(|c| {
            if " \t\n\r\x0b\x0c".contains(c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("jwt_authn_access_denied{{{m}}}")
}
