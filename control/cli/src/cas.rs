//! `roost ca init|add|code|verify|list|show|remove`: the CA certificates that
//! `certificateAuthority` devices chain to (`/roost/certificates`; docs/x509.md).
//!
//! A CA is trusted once its key is proven: `init` makes a CA and proves it at once; `add`
//! registers yours and proves it when given the key, or prints the verification code for
//! `verify` to take the certificate you sign with it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use crate::routes::call_at;

#[derive(Subcommand)]
pub enum CaCmd {
    /// Make a CA for a fleet (certificate and key in <data>/cas), register and verify it.
    Init {
        /// Its name at the hub.
        #[arg(default_value = "fleet")]
        name: String,
        /// Days it is valid.
        #[arg(long, default_value_t = 3650)]
        valid_days: u32,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// Register a CA certificate (PEM); with --key, prove possession of its key at once.
    Add {
        name: String,
        certificate: PathBuf,
        /// The CA's private key (PEM): signs the verification certificate here, never sent.
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// Generate a verification code: sign a certificate whose common name is the code with
    /// the CA's key, then `roost ca verify`.
    Code {
        name: String,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// Prove possession of a CA's key with a certificate (PEM) naming the pending code.
    Verify {
        name: String,
        certificate: PathBuf,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// List the CA certificates.
    List {
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// Show one CA certificate.
    Show {
        name: String,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// Remove a CA: the devices that authenticated through it are disconnected.
    Remove {
        name: String,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
}

fn path(name: &str) -> String {
    format!("/roost/certificates/{}", crate::cli::path_id(name))
}

/// Where `roost ca init` keeps a CA's certificate and key.
pub fn files(data_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("cas");
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Registers `cert_pem` as `name` and proves possession of `key_pem`.
fn add_and_prove(data_dir: &Path, name: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<Value> {
    register(data_dir, name, cert_pem)?;
    let pending = call_at(data_dir, Method::POST, &format!("{}/generateVerificationCode", path(name)), None)?;
    let code = pending["properties"]["verificationCode"]
        .as_str()
        .context("the hub gave no verification code")?;
    let proof = roost_control::certs::verification_cert(code, cert_pem, key_pem)?;
    verify(data_dir, name, &proof)
}

fn register(data_dir: &Path, name: &str, cert_pem: &str) -> anyhow::Result<Value> {
    let body = json!({ "properties": { "certificate": cert_pem } });
    call_at(data_dir, Method::PUT, &path(name), Some(serde_json::to_vec(&body)?))
}

fn verify(data_dir: &Path, name: &str, proof_pem: &str) -> anyhow::Result<Value> {
    let body = json!({ "certificate": proof_pem });
    call_at(data_dir, Method::POST, &format!("{}/verify", path(name)), Some(serde_json::to_vec(&body)?))
}

fn summary(v: &Value) {
    let p = &v["properties"];
    println!("name: {}", v["name"].as_str().unwrap_or(""));
    println!("subject: {}", p["subject"].as_str().unwrap_or(""));
    println!("thumbprint: {}", p["thumbprint"].as_str().unwrap_or(""));
    println!("verified: {}", p["isVerified"].as_bool().unwrap_or(false));
}

pub fn run(cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Init {
            name,
            valid_days,
            data_dir,
        } => {
            let (cert_path, key_path) = files(&data_dir, &name);
            if cert_path.exists() {
                anyhow::bail!("{} exists: a CA named {name} was made here already", cert_path.display());
            }
            let (cert, key) = roost_control::certs::fleet_ca(&format!("roost {name} CA"), valid_days)?;
            let described = add_and_prove(&data_dir, &name, &cert, &key)?;
            roost_common::hubfile::private_dir(&data_dir.join("cas"))?;
            roost_control::certs::write_private(&key_path, &key)?;
            std::fs::write(&cert_path, &cert).with_context(|| format!("writing {}", cert_path.display()))?;
            summary(&described);
            println!("certificate: {}", cert_path.display());
            println!("key: {}", key_path.display());
        }
        CaCmd::Add {
            name,
            certificate,
            key,
            data_dir,
        } => {
            let cert = read(&certificate)?;
            match key {
                Some(key) => summary(&add_and_prove(&data_dir, &name, &cert, &read(&key)?)?),
                None => {
                    register(&data_dir, &name, &cert)?;
                    let pending = call_at(&data_dir, Method::POST, &format!("{}/generateVerificationCode", path(&name)), None)?;
                    summary(&pending);
                    println!(
                        "verification code: {}",
                        pending["properties"]["verificationCode"].as_str().unwrap_or("")
                    );
                    println!("sign a certificate with this common name using the CA's key, then: roost ca verify {name} <certificate.pem>");
                }
            }
        }
        CaCmd::Code { name, data_dir } => {
            let pending = call_at(&data_dir, Method::POST, &format!("{}/generateVerificationCode", path(&name)), None)?;
            println!("{}", pending["properties"]["verificationCode"].as_str().unwrap_or(""));
        }
        CaCmd::Verify {
            name,
            certificate,
            data_dir,
        } => summary(&verify(&data_dir, &name, &read(&certificate)?)?),
        CaCmd::List { data_dir } => {
            let v = call_at(&data_dir, Method::GET, "/roost/certificates", None)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        CaCmd::Show { name, data_dir } => {
            let v = call_at(&data_dir, Method::GET, &path(&name), None)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        CaCmd::Remove { name, data_dir } => {
            call_at(&data_dir, Method::DELETE, &path(&name), None)?;
            println!("removed {name}");
        }
    }
    Ok(())
}
